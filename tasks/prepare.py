"""Stage 1, prepare: load scenario YAML, validate it with Great Expectations, split train/eval.

Reads `paths.scenarios`; writes `paths.prepared`/{train,eval}.parquet and validation.json. A failed
validation exits non-zero, names the files, ids and expectations, and leaves the previous prepared
data untouched.
"""

from __future__ import annotations

from grpo import scenarios as S
from grpo.io import atomic_path, write_json
from grpo.validation import ValidationFailed, validate
from tasks.common import cli, log_metrics, stage_run


def run(params: dict) -> dict:
    p = params["prepare"]
    with stage_run("prepare", params, ("prepare", "seed")) as (mlflow, _):
        df = S.to_frame(S.load_dir(params["paths"]["scenarios"]))
        try:
            report = validate(df, p)
        except ValidationFailed as e:
            mlflow.log_dict(e.report, "validation.json")
            mlflow.set_tag("validation", "failed")
            raise
        train, evaluation = S.split(df, p["eval_fraction"], params["seed"])
        with atomic_path(params["paths"]["prepared"], is_dir=True) as tmp:
            train.to_parquet(tmp / "train.parquet", index=False)
            evaluation.to_parquet(tmp / "eval.parquet", index=False)
            write_json(tmp / "validation.json", report)
        summary = {"scenarios": len(df), "train": len(train), "eval": len(evaluation),
                   "expectations": report["evaluated"], "validation_success": int(report["success"])}
        log_metrics(mlflow, summary)
        mlflow.log_dict(report, "validation.json")
    return summary


if __name__ == "__main__":
    cli(run)
