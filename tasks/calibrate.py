"""Stage 4, calibrate: fit per-component z-score normalisers on the labels and save them.

Every component of the composite reward is calibrated, the learned reward model's score included
(it is scored on the same labelled conversations). A global rescale of the total would be cancelled
by GRPO's group normalisation, so components are calibrated before weighting.

Reads `paths.labels` and `paths.reward_model`; writes `paths.calibration`.
"""

from __future__ import annotations

import json

import pandas as pd

from grpo.io import write_json
from grpo.models import pick_device
from grpo.reward_model import RewardModel
from grpo.rewards import fit_zscore
from tasks.common import cli, log_metrics, stage_run


def run(params: dict) -> dict:
    paths, p = params["paths"], params["calibrate"]
    if p["method"] != "zscore":
        raise ValueError(f"calibrate.method: only 'zscore' is implemented, got {p['method']!r}")
    with stage_run("calibrate", params, ("calibrate", "reward")) as (mlflow, _):
        df = pd.read_parquet(paths["labels"])
        comps = {k: df[k].to_numpy() for k in params["reward"]["weights"] if k != "reward_model"}
        if "reward_model" in params["reward"]["weights"]:
            rm = RewardModel.load(paths["reward_model"], str(pick_device(params["device"])))
            comps["reward_model"] = rm.predict([json.loads(c) for c in df["conversation"]])
        calibration = fit_zscore(comps, p["min_std"])
        write_json(paths["calibration"], {"method": "zscore", "components": calibration})
        flat = {f"{k}.{s}": v for k, d in calibration.items() for s, v in d.items()}
        log_metrics(mlflow, flat)
        mlflow.log_dict({"correlation": pd.DataFrame(comps).corr().round(4).to_dict()}, "component_correlation.json")
    return flat


if __name__ == "__main__":
    cli(run)
