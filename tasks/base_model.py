"""Stage 0, base_model: materialise the policy named in params as safetensors plus tokenizer.

Reads `base_model.source`; writes `paths.base_model`. A GGUF takes ~40 s to dequantise, so this is
done once here and every later stage loads the safetensors.
"""

from __future__ import annotations

from grpo.io import atomic_path
from grpo.models import materialise
from tasks.common import cli, stage_run


def run(params: dict) -> dict:
    with stage_run("base_model", params, ("base_model",)) as (mlflow, _):
        with atomic_path(params["paths"]["base_model"], is_dir=True) as tmp:
            info = materialise(params["base_model"]["source"], tmp)
        mlflow.log_params({f"model.{k}": v for k, v in info.items()})
    return info


if __name__ == "__main__":
    cli(run)
