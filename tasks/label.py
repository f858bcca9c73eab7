"""Stage 2, label: sample a group of conversations per training scenario from the base policy and
score each with the heuristic reward components. At most `label.max_scenarios` training scenarios
are labelled (a fixed, domain-balanced subset), since generation dominates the stage's time.

Reads the prepared train set and the base model; writes `paths.labels` (one row per conversation:
scenario, conversation JSON, per-component scores, `score` and `label_source`).
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from grpo import scenarios as S
from grpo.io import atomic_path
from grpo.models import load_causal_lm, load_tokenizer, pick_device
from grpo.rewards import heuristic_components, weighted_sum
from grpo.rollout import ConversationEnvironment, rollout_in_chunks
from tasks.common import cli, log_metrics, stage_run


def run(params: dict) -> dict:
    paths, p = params["paths"], params["label"]
    with stage_run("label", params, ("label", "rollout", "reward", "seed")) as (mlflow, _):
        scenarios = S.subsample(S.from_frame(pd.read_parquet(f"{paths['prepared']}/train.parquet")),
                                p["max_scenarios"], params["seed"])
        tok = load_tokenizer(paths["base_model"])
        model = load_causal_lm(paths["base_model"], pick_device(params["device"]))
        env = ConversationEnvironment(tok, **params["rollout"])
        torch.manual_seed(params["seed"])
        trajs = rollout_in_chunks(env, model, scenarios, p["group_size"], p["chunk_scenarios"], desc="label")

        comps = heuristic_components(params["reward"])
        weights = {c.name: params["reward"]["weights"][c.name] for c in comps}
        rows = []
        for g, scen in enumerate(scenarios):
            group = [t for t in trajs if t.group == g]
            scores = {c.name: c([t.messages for t in group], scen) for c in comps}
            total = weighted_sum(scores, weights)
            for j, t in enumerate(group):
                rows.append({"scenario_id": scen.id, "domain": scen.domain, "sample": j,
                             "conversation": json.dumps(t.messages), **{k: float(v[j]) for k, v in scores.items()},
                             "score": float(total[j]), "label_source": "heuristic"})
        df = pd.DataFrame(rows)
        with atomic_path(paths["labels"]) as tmp:
            df.to_parquet(tmp, index=False)
        summary = {"labels": len(df), "scenarios": len(scenarios), "score_mean": df["score"].mean(),
                   "score_std": df["score"].std(), **{f"{k}_mean": df[k].mean() for k in weights},
                   "gen_tokens_per_s": env.stats.get("gen_tokens_per_s", 0.0)}
        log_metrics(mlflow, summary)
    return summary


if __name__ == "__main__":
    cli(run)
