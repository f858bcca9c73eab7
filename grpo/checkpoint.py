"""Training checkpoints: adapter, optimizer, RNG states, the data order, history and the step.

A checkpoint is one directory written atomically (a kill mid-write leaves the previous one), and it
carries a fingerprint of the run's configuration, so a changed run never resumes from a stale one.
It holds tensors and plain data only and is read with ``torch.load(weights_only=True)``: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from grpo.io import atomic_path

log = logging.getLogger(__name__)


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def numpy_state() -> tuple:
    """numpy's RNG state with its key array as a tensor, so the checkpoint loads with
    ``weights_only=True`` (which refuses numpy objects)."""
    name, keys, *rest = np.random.get_state()
    return (name, torch.from_numpy(keys.copy()), *rest)


def save(directory: str | Path, step: int, model, optimizer, state: dict, config: dict) -> None:
    with atomic_path(directory, is_dir=True) as tmp:
        torch.save(
            {
                "step": step,
                "adapter": get_peft_model_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": numpy_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "state": state,
                "fingerprint": fingerprint(config),
            },
            tmp / "checkpoint.pt",
        )


def load(directory: str | Path, model, optimizer, config: dict) -> tuple[int, dict] | None:
    """Restore a checkpoint into ``model`` and ``optimizer``; return ``(step, state)``, or ``None``
    when there is none or it belongs to another configuration (logged)."""
    path = Path(directory) / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no pickle
    if ckpt["fingerprint"] != fingerprint(config):
        log.warning("checkpoint %s was written by another configuration; starting from scratch", path)
        return None
    set_peft_model_state_dict(model, ckpt["adapter"])
    optimizer.load_state_dict(ckpt["optimizer"])
    random.setstate(ckpt["rng"]["python"])
    name, keys, *rest = ckpt["rng"]["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    log.info("resuming from %s at step %d", path, ckpt["step"])
    return ckpt["step"], ckpt["state"]
