"""Stage 3, train_reward: fit the learned reward model (sentence-transformers encoder + MLP head)
on the labels and report held-out MSE, Pearson, Spearman and pairwise accuracy within groups.

Reads `paths.labels`; writes `paths.reward_model` and `paths.metrics`/reward.json. Validation is
split by scenario, so no scenario's conversations sit on both sides. The stage fails when the
held-out Spearman correlation is below `train_reward.min_spearman`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from grpo.io import atomic_path, write_json
from grpo.models import pick_device
from grpo.reward_model import RewardModel, held_out_scenarios, regression_metrics
from grpo_agents.params import Paths, TrainRewardParams
from mlflow_io.tracking import log_metrics


def run(train_reward: TrainRewardParams, encoder: str, seed: int, device: str, paths: Paths) -> dict:
    labels = pd.read_parquet(paths.labels)
    ids = labels["scenario_id"]
    held = ids.isin(held_out_scenarios(ids.tolist(), train_reward.val_fraction, seed)).to_numpy()
    convs = [json.loads(c) for c in labels["conversation"]]
    y = torch.tensor(labels["score"].to_numpy(), dtype=torch.float32)
    groups = torch.tensor(pd.factorize(ids)[0])
    rm = RewardModel.create(encoder, train_reward.hidden, train_reward.max_tokens, seed, str(pick_device(device)))
    va = torch.tensor(held)
    tr = ~va
    train_convs = [c for c, m in zip(convs, tr) if m]
    val_convs = [c for c, m in zip(convs, va) if m]
    fit = rm.fit(train_convs, y[tr], groups[tr], val_convs, y[va], groups[va], train_reward.fit_config())
    metrics = regression_metrics(rm.predict(val_convs), y[va].numpy(), ids[held].to_numpy(), float(y[tr].mean()))
    metrics.update(fit, train_n=int(tr.sum()))
    log_metrics(metrics)
    if not metrics["spearman"] >= train_reward.min_spearman:
        raise ValueError(
            f"reward model held-out Spearman {metrics['spearman']:.3f} is below train_reward.min_spearman "
            f"{train_reward.min_spearman} (metrics: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}); "
            "the previous reward model was kept"
        )
    with atomic_path(paths.reward_model, is_dir=True) as tmp:
        rm.save(tmp)
    write_json(f"{paths.metrics}/reward.json", metrics)
    return metrics


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("train_reward")
