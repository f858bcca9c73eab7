"""Stage 2, label: sample a group of conversations per training scenario from the base policy, score
each with the heuristic reward components and, for up to `judge.max_groups` groups, with the LLM
judge (grpo/judge.py).

At most `label.max_scenarios` training scenarios are labelled (a fixed, domain-balanced subset),
since generation dominates the stage's time. The judge is any OpenAI-compatible endpoint
(`judge.base_url`); when that is null, the base policy is served on loopback by the project's own
server (grpo/serving.py) and judges. A group the judge cannot answer usably, even after one repair
request, keeps its heuristic score with `label_source = "fallback"`; groups not sent to the judge
are `"heuristic"`. The stage fails when the fallback rate passes `judge.max_fallback_rate`.
Judgements are cached in `paths.judge_cache`, so a rerun asks only for what is missing.

Reads the prepared train set and the base model; writes `paths.labels` (one row per conversation:
scenario, conversation JSON, per-component scores, `heuristic_score`, `judge_score`, `score` (the
judge's where it answered, else the heuristic) and `label_source`) and `paths.metrics`/label.json.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from grpo import scenarios as S
from grpo.io import atomic_path, write_json
from grpo.models import load_causal_lm, load_tokenizer, pick_device
from grpo.reward_model import regression_metrics
from grpo.rewards import aggregate, domain_weights, heuristic_components
from grpo.rollout import ConversationEnvironment, rollout_in_chunks
from tasks.common import cli, log_metrics, stage_run
from tasks.scoring import run_judge

def run(params: dict) -> dict:
    paths, p, j = params["paths"], params["label"], params["judge"]
    with stage_run("label", params, ("label", "rollout", "reward", "judge", "seed")) as (mlflow, _):
        scenarios = S.subsample(S.from_frame(pd.read_parquet(f"{paths['prepared']}/train.parquet")),
                                p["max_scenarios"], params["seed"])
        tok = load_tokenizer(paths["base_model"])
        model = load_causal_lm(paths["base_model"], pick_device(params["device"]))
        env = ConversationEnvironment(tok, **params["rollout"])
        torch.manual_seed(params["seed"])
        trajs = rollout_in_chunks(env, model, scenarios, p["group_size"], p["chunk_scenarios"], desc="label")
        groups = [[t.messages for t in trajs if t.group == g] for g in range(len(scenarios))]

        judged = set(s.id for s in S.subsample(scenarios, j["max_groups"], params["seed"])) if j["enabled"] else set()
        idx = [g for g, s in enumerate(scenarios) if s.id in judged]
        verdicts = dict(zip(idx, run_judge(params, model, tok, [(scenarios[g].domain, groups[g]) for g in idx]))) if idx else {}

        r = params["reward"]
        comps = heuristic_components(r, params["encoder"])
        rows = []
        for g, scen in enumerate(scenarios):
            scores = {c.name: c(groups[g], scen) for c in comps}
            weights = {k: w for k, w in domain_weights(r, scen.domain).items() if k in scores}
            heuristic = aggregate(scores, weights, r["aggregate"])
            v = verdicts.get(g)
            source = "heuristic" if v is None else v.source
            for k, conv in enumerate(groups[g]):
                judge_score = v.scores[k] if v is not None and v.scores else float("nan")
                rows.append({"scenario_id": scen.id, "domain": scen.domain, "sample": k, "conversation": json.dumps(conv),
                             **{c: float(s[k]) for c, s in scores.items()}, "heuristic_score": float(heuristic[k]),
                             "judge_score": judge_score, "score": judge_score if source == "judge" else float(heuristic[k]),
                             "label_source": source, "judge_note": (v.explanations[k] if v and v.scores else (v.error if v else ""))})
        df = pd.DataFrame(rows)

        n_judged = len(verdicts)
        fallback = sum(v.source == "fallback" for v in verdicts.values())
        summary = {"labels": len(df), "scenarios": len(scenarios), "score_mean": df["score"].mean(), "score_std": df["score"].std(),
                   **{f"{c.name}_mean": df[c.name].mean() for c in comps}, "gen_tokens_per_s": env.stats.get("gen_tokens_per_s", 0.0),
                   "judge_groups": n_judged, "judge_fallback_rate": fallback / n_judged if n_judged else 0.0,
                   "judge_repair_rate": sum(v.repaired for v in verdicts.values()) / n_judged if n_judged else 0.0,
                   **{f"label_source_{s}": int((df["label_source"] == s).sum()) for s in ("judge", "fallback", "heuristic")}}
        ok = df[df["label_source"] == "judge"]
        if len(ok) > 1:  # agreement of the heuristic with the judge, where the judge answered
            agree = regression_metrics(ok["heuristic_score"].to_numpy(), ok["judge_score"].to_numpy(),
                                       ok["scenario_id"].to_numpy(), float(ok["judge_score"].mean()))
            summary.update(judge_heuristic_spearman=agree["spearman"], judge_heuristic_pairwise=agree["pairwise_accuracy"])
        log_metrics(mlflow, summary)
        mlflow.log_dict({f"{scenarios[g].id}": v.__dict__ for g, v in verdicts.items()}, "judgements.json")
        if n_judged and summary["judge_fallback_rate"] > j["max_fallback_rate"]:
            raise ValueError(f"judge fallback rate {summary['judge_fallback_rate']:.2f} ({fallback} of {n_judged} groups) is above "
                             f"judge.max_fallback_rate {j['max_fallback_rate']}; the judge's errors are in the MLflow run's "
                             "judgements.json. Labels were not written.")
        with atomic_path(paths["labels"]) as tmp:
            df.to_parquet(tmp, index=False)
        write_json(f"{paths['metrics']}/label.json", summary)
    return summary


if __name__ == "__main__":
    cli(run)
