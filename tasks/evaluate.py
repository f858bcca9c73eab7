"""Stage 6, evaluate: base against trained policy on the held-out scenarios.

Both policies see the same scenarios, the same scripted users and the same sampling seed, and are
scored by the same composite reward. Writes `paths.metrics`/eval.json (means, per-component means,
paired 95% bootstrap CI of trained - base over scenarios) and `paths.plots`/eval.csv.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from grpo import scenarios as S
from grpo.evaluation import paired_bootstrap_ci
from grpo.io import atomic_path, write_json
from grpo.models import load_causal_lm, load_tokenizer, pick_device
from grpo.rollout import ConversationEnvironment, rollout_in_chunks
from tasks.common import cli, load_reward, log_metrics, stage_run


def score_policy(model_dir: str, scenarios, reward, params: dict, name: str) -> pd.DataFrame:
    """One row per scenario: composite reward and raw components, averaged over the samples."""
    p = params["evaluate"]
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, pick_device(params["device"]))
    env = ConversationEnvironment(tok, **params["rollout"])
    torch.manual_seed(params["seed"])
    trajs = rollout_in_chunks(env, model, scenarios, p["samples_per_scenario"], len(scenarios), desc=f"eval {name}")
    rows = []
    for g, scen in enumerate(scenarios):
        group = [t for t in trajs if t.group == g]
        total, raw = reward([t.messages for t in group], scen)
        rows.append({"scenario_id": scen.id, "domain": scen.domain, "reward": float(np.mean(total)),
                     **{k: float(np.mean(v)) for k, v in raw.items()},
                     "example": group[0].messages[-1]["content"]})
    return pd.DataFrame(rows)


def run(params: dict) -> dict:
    paths = params["paths"]
    with stage_run("evaluate", params, ("evaluate", "rollout", "reward", "seed")) as (mlflow, _):
        scenarios = S.subsample(S.from_frame(pd.read_parquet(f"{paths['prepared']}/eval.parquet")),
                                params["evaluate"]["max_scenarios"], params["seed"])
        reward = load_reward(params)
        base = score_policy(paths["base_model"], scenarios, reward, params, "base")
        trained = score_policy(paths["policy"], scenarios, reward, params, "trained")
        comps = [c for c in base.columns if c not in ("scenario_id", "domain", "reward", "example")]
        p = params["evaluate"]
        diff = paired_bootstrap_ci(base["reward"], trained["reward"], p["bootstrap"], p["ci_level"], params["seed"])
        result = {
            "base": {"reward_mean": float(base["reward"].mean()), **{k: float(base[k].mean()) for k in comps}},
            "trained": {"reward_mean": float(trained["reward"].mean()), **{k: float(trained[k].mean()) for k in comps}},
            "difference": diff,
            "scenarios": len(scenarios),
            "samples_per_scenario": p["samples_per_scenario"],
        }
        write_json(f"{paths['metrics']}/eval.json", result)
        table = base.merge(trained, on=["scenario_id", "domain"], suffixes=("_base", "_trained"))
        with atomic_path(f"{paths['plots']}/eval.csv") as tmp:
            table.drop(columns=["example_base", "example_trained"]).to_csv(tmp, index=False)
        log_metrics(mlflow, {f"base.{k}": v for k, v in result["base"].items()})
        log_metrics(mlflow, {f"trained.{k}": v for k, v in result["trained"].items()})
        log_metrics(mlflow, {f"diff.{k}": v for k, v in diff.items()})
        mlflow.log_table(table, "eval_table.json")
    return {"base": result["base"]["reward_mean"], "trained": result["trained"]["reward_mean"], **diff}


if __name__ == "__main__":
    cli(run)
