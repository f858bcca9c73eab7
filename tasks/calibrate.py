"""Stage 4, calibrate: fit a normaliser per reward component on the labels (grpo/calibration.py).

Every component of the composite reward is calibrated, the learned reward model's score included
(it is scored on the same labelled conversations). A global rescale of the total would be cancelled
by GRPO's group normalisation, so components are calibrated before weighting. `isotonic` maps each
component to the judge's scores and needs judge-labelled rows.

Reads `paths.labels` and `paths.reward_model`; writes `paths.calibration`, and reports each
component's mean/std before and after, and the correlation matrix between components, to MLflow
and as DVC plots (`paths.plots`/calibration.csv, component_correlation.csv).
"""

from __future__ import annotations

import json

import pandas as pd

from grpo.calibration import CalibrationConfig, apply_all, fit_all
from grpo.io import atomic_path, write_json
from grpo.models import pick_device
from grpo.reward_model import RewardModel
from grpo.rewards import RewardConfig
from grpo_agents.params import Paths
from mlflow_io.tracking import log_dict, log_metrics, log_table


def run(calibrate: CalibrationConfig, reward: RewardConfig, device: str, paths: Paths) -> dict:
    labels = pd.read_parquet(paths.labels)
    missing = [k for k in reward.heuristics() if k not in labels.columns]
    if missing:
        raise ValueError(f"{paths.labels} has no scores for reward component(s) {missing}; rerun label")
    comps = {k: labels[k].to_numpy() for k in reward.heuristics()}
    if "reward_model" in reward.weights:
        rm = RewardModel.load(paths.reward_model, str(pick_device(device)))
        comps["reward_model"] = rm.predict([json.loads(c) for c in labels["conversation"]])
    target = labels["judge_score"].where(labels["label_source"] == "judge").to_numpy()
    calibration = fit_all(comps, calibrate, target)
    write_json(paths.calibration, {"components": calibration})

    before, after = pd.DataFrame(comps), pd.DataFrame(apply_all(comps, calibration))
    stats = pd.DataFrame(
        {
            "component": list(comps),
            "method": [calibration[k]["method"] for k in comps],
            "mean_before": before.mean().values,
            "std_before": before.std(ddof=0).values,
            "mean_after": after.mean().values,
            "std_after": after.std(ddof=0).values,
        }
    ).round(6)
    corr = before.corr().fillna(0.0).round(4)
    names = list(corr.columns)
    pairs = pd.DataFrame(
        [{"pair": f"{a} ~ {b}", "r": corr.loc[a, b]} for i, a in enumerate(names) for b in names[i + 1 :]]
    )
    with atomic_path(f"{paths.plots}/calibration.csv") as tmp:
        stats.to_csv(tmp, index=False)
    with atomic_path(f"{paths.plots}/component_correlation.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    flat = {f"{r.component}.{s}": getattr(r, s) for r in stats.itertuples() for s in ("std_before", "std_after")}
    log_metrics(flat)
    log_table(stats, "calibration_stats.json")
    log_dict({"correlation": corr.to_dict()}, "component_correlation.json")
    return flat


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("calibrate")
