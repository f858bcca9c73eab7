"""Stage 3, train_reward: fit the learned reward model (sentence-transformers encoder + MLP head)
on the labels and report held-out MSE, Pearson, Spearman and pairwise accuracy within groups.

Reads `paths.labels`; writes `paths.reward_model` and `paths.metrics`/reward.json. Validation is
split by scenario, so no scenario's conversations sit on both sides. The stage fails when the
held-out Spearman correlation is below `train_reward.min_spearman`.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import torch

from grpo.io import atomic_path, write_json
from grpo.models import pick_device
from grpo.reward_model import FitConfig, RewardModel, regression_metrics
from tasks.common import cli, log_metrics, stage_run

FIT_KEYS = ("epochs", "learning_rate", "patience", "unfreeze_epochs", "encoder_learning_rate", "batch_size",
            "warmup_fraction", "max_grad_norm", "pairwise_weight")


def val_scenarios(ids: list[str], fraction: float, seed: int) -> set[str]:
    ranked = sorted(set(ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return set(ranked[: max(1, round(len(ranked) * fraction))])


def run(params: dict) -> dict:
    paths, p = params["paths"], params["train_reward"]
    with stage_run("train_reward", params, ("train_reward", "encoder", "seed")) as (mlflow, _):
        df = pd.read_parquet(paths["labels"])
        held = df["scenario_id"].isin(val_scenarios(df["scenario_id"].tolist(), p["val_fraction"], params["seed"])).to_numpy()
        convs = [json.loads(c) for c in df["conversation"]]
        y = torch.tensor(df["score"].to_numpy(), dtype=torch.float32)
        groups = torch.tensor(pd.factorize(df["scenario_id"])[0])
        rm = RewardModel.create(params["encoder"], p["hidden"], p["max_tokens"], params["seed"], str(pick_device(params["device"])))
        va = torch.tensor(held)
        tr = ~va
        pick = lambda xs, mask: [x for x, m in zip(xs, mask) if m]
        fit = rm.fit(pick(convs, tr), y[tr], groups[tr], pick(convs, va), y[va], groups[va],
                     FitConfig(**{k: p[k] for k in FIT_KEYS}))
        pred = rm.predict(pick(convs, va))
        metrics = regression_metrics(pred, y[va].numpy(), df.loc[held, "scenario_id"].to_numpy(), float(y[tr].mean()))
        metrics.update(fit, train_n=int(tr.sum()))
        log_metrics(mlflow, metrics)
        if not metrics["spearman"] >= p["min_spearman"]:
            raise ValueError(f"reward model held-out Spearman {metrics['spearman']:.3f} is below train_reward.min_spearman "
                             f"{p['min_spearman']} (metrics: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}); "
                             "the previous reward model was kept")
        with atomic_path(paths["reward_model"], is_dir=True) as tmp:
            rm.save(tmp)
        write_json(f"{paths['metrics']}/reward.json", metrics)
    return metrics


if __name__ == "__main__":
    cli(run)
