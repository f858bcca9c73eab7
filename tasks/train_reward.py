"""Stage 3, train_reward: fit the learned reward model (sentence-transformers encoder + MLP head)
on the labels and report held-out MSE, Pearson, Spearman and pairwise accuracy.

Reads `paths.labels`; writes `paths.reward_model` and `paths.metrics`/reward.json. Validation is
split by scenario, so no scenario's conversations sit on both sides.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import torch

from grpo.io import atomic_path, write_json
from grpo.models import pick_device
from grpo.reward_model import RewardModel, regression_metrics
from tasks.common import cli, log_metrics, stage_run


def val_scenarios(ids: list[str], fraction: float, seed: int) -> set[str]:
    ranked = sorted(set(ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return set(ranked[: max(1, round(len(ranked) * fraction))])


def run(params: dict) -> dict:
    paths, p = params["paths"], params["train_reward"]
    with stage_run("train_reward", params, ("train_reward", "encoder", "seed")) as (mlflow, _):
        df = pd.read_parquet(paths["labels"])
        held = df["scenario_id"].isin(val_scenarios(df["scenario_id"].tolist(), p["val_fraction"], params["seed"]))
        rm = RewardModel.create(params["encoder"], p["hidden"], p["max_tokens"], params["seed"], str(pick_device(params["device"])))
        x = rm.embed([json.loads(c) for c in df["conversation"]])
        y = torch.tensor(df["score"].to_numpy(), dtype=torch.float32)
        va = torch.tensor(held.to_numpy())
        tr = ~va
        fit = rm.fit(x[tr], y[tr], x[va], y[va], p["epochs"], p["learning_rate"], p["patience"])
        pred = rm.score_embeddings(x[va])
        metrics = regression_metrics(pred, y[va].numpy(), df.loc[held, "scenario_id"].to_numpy(), float(y[tr].mean()))
        metrics.update(fit, train_n=int(tr.sum()))
        with atomic_path(paths["reward_model"], is_dir=True) as tmp:
            rm.save(tmp)
        write_json(f"{paths['metrics']}/reward.json", metrics)
        log_metrics(mlflow, metrics)
    return metrics


if __name__ == "__main__":
    cli(run)
