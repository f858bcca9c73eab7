"""Stage 6, train_policy: GRPO with LoRA on the SFT policy (or, with `sft.enabled: false`, the base
model) over multi-turn scenario episodes.

Reads that policy, the prepared train set, the reward model and the calibration; writes the merged
policy to `paths.policy`, `paths.metrics`/train.json and the per-step curve `paths.plots`/train.csv.
The reference policy is the starting one (the adapter disabled).
`train_policy.backend` picks the native loop (grpo/trainer.py) or TRL's GRPOTrainer
(grpo/trl_backend.py) on the same episodes.

With `train_policy.distributed.world_size` N > 1 the stage starts itself again as N processes
under torchrun (grpo/distributed.py) and waits: rank 0 writes the outputs and logs to this stage's
MLflow run. If any rank fails, the stage fails, the outputs stay as they were, and a rerun resumes
from the last checkpoint.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import pandas as pd

from grpo import distributed, scenarios
from grpo.config import GRPOConfig, RolloutConfig, SFTConfig
from grpo.io import atomic_path, read_json, tree_sha256, write_json
from grpo.models import load_policy, save_policy
from grpo.rewards import RewardConfig, load_composite
from grpo.rollout import ConversationEnvironment
from grpo.trainer import train
from grpo_agents.params import Paths
from grpo_agents.stages import launch_ranks
from mlflow_io.tracking import log_metrics


def run(
    train_policy: GRPOConfig,
    sft: SFTConfig,
    rollout: RolloutConfig,
    reward: RewardConfig,
    seed: int,
    encoder: str,
    device: str,
    paths: Paths,
) -> dict:
    ranks = train_policy.distributed.world_size
    if ranks > 1 and not distributed.is_worker():
        sections = {"train_policy": train_policy, "sft": sft, "rollout": rollout, "reward": reward, "seed": seed}
        launch_ranks("train_policy", ranks, {**sections, "encoder": encoder, "device": device, "paths": paths})
        return read_json(f"{paths.metrics}/train.json")
    config = train_policy.model_copy(update={"seed": seed})
    train_set = scenarios.from_frame(pd.read_parquet(f"{paths.prepared}/train.parquet"))
    where = distributed.device(device)
    distributed.init(where)
    start = paths.policy_start(sft)
    model, tokenizer = load_policy(start, str(where))
    env = ConversationEnvironment(tokenizer, rollout)
    composite = load_composite(reward, paths.calibration, paths.reward_model, encoder, model.device.type)

    # A checkpoint resumes only the same run: the same config, scenarios and rollout (the trainer
    # adds those), reward settings, calibration, reward model and starting policy.
    fingerprint = {
        "reward": reward.model_dump(),
        "encoder": encoder,
        "sha256.start_model": tree_sha256(start),
        "sha256.reward_model": tree_sha256(paths.reward_model),
        "sha256.calibration": hashlib.sha256(Path(paths.calibration).read_bytes()).hexdigest(),
    }

    def log_step(step: int, row: dict) -> None:  # rank 0 only
        log_metrics(row, step)

    fit = train
    if config.backend == "trl":
        from grpo.trl_backend import train_trl

        fit = partial(train_trl, device=model.device.type)
    model, history = fit(
        model,
        tokenizer,
        train_set,
        composite,
        env,
        config,
        on_step=log_step,
        checkpoint_dir=paths.checkpoints,
        fingerprint=fingerprint,
    )
    if not distributed.is_main():
        return {}
    # refuses non-finite weights: an update the step checks let through (TRL applies a step before it logs)
    save_policy(model.merge_and_unload(), tokenizer, paths.policy)
    with atomic_path(f"{paths.plots}/train.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    k = max(1, len(history) // 4)
    summary = {
        "steps": len(history),
        "reward_first_quarter": sum(r["reward_mean"] for r in history[:k]) / k,
        "reward_last_quarter": sum(r["reward_mean"] for r in history[-k:]) / k,
        "kl_last": history[-1].get("kl", 0.0),
        **({"skipped_steps": history[-1]["skipped_steps"]} if "skipped_steps" in history[-1] else {}),  # native only
        "seconds_per_step": sum(r["step_seconds"] for r in history) / len(history),
    }
    write_json(f"{paths.metrics}/train.json", summary)
    log_metrics(summary)
    return summary


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("train_policy")
