"""Stage 0, base_model: materialise the policy named in params as safetensors plus tokenizer.

Reads `base_model.source`; writes `paths.base_model`. A GGUF takes ~40 s to dequantise, so this is
done once here and every later stage loads the safetensors.
"""

from __future__ import annotations

from grpo.io import atomic_path
from grpo.models import materialise
from grpo_agents.params import BaseModelParams, Paths
from mlflow_io.tracking import log_params


def run(base_model: BaseModelParams, paths: Paths) -> dict:
    with atomic_path(paths.base_model, is_dir=True) as tmp:
        info = materialise(base_model.source, tmp)
    log_params({f"model.{k}": v for k, v in info.items()})
    return info


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("base_model")
