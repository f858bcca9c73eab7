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
judge's order on the heuristic's scale where it answered, else the heuristic) and `label_source`) and `paths.metrics`/label.json.
"""

from __future__ import annotations

import pandas as pd

from grpo import scenarios
from grpo.config import RolloutConfig
from grpo.io import atomic_path, write_json
from grpo.judge import judge_groups
from grpo.labels import label_frame, label_summary
from grpo.models import load_policy
from grpo.rewards import RewardConfig, heuristic_components
from grpo.rollout import RolloutJob, map_jobs, merge_jobs
from grpo_agents.params import BaseModelParams, JudgeParams, LabelParams, Paths
from mlflow_io.tracking import log_dict, log_metrics


def run(
    label: LabelParams,
    rollout: RolloutConfig,
    reward: RewardConfig,
    judge: JudgeParams,
    seed: int,
    encoder: str,
    base_model: BaseModelParams,
    device: str,
    paths: Paths,
) -> dict:
    train = scenarios.from_frame(pd.read_parquet(f"{paths.prepared}/train.parquet"))
    train = scenarios.subsample(train, label.max_scenarios, seed)
    # one job per `label.chunk_scenarios` scenarios, each seeded by its position: the labels do not
    # depend on where the jobs ran (here, or on a Dask cluster under `grpo-agents run --rollout-workers`)
    jobs = [
        RolloutJob(
            f"label {i}",
            paths.base_model,
            train[i : i + label.chunk_scenarios],
            label.group_size,
            rollout,
            seed + i,
            device,
        )
        for i in range(0, len(train), label.chunk_scenarios)
    ]
    trajs, stats = merge_jobs(map_jobs(jobs, "label"))
    groups = [[t.messages for t in trajs if t.group == g] for g in range(len(train))]

    judged = {s.id for s in scenarios.subsample(train, judge.max_groups, seed)} if judge.enabled else set()
    idx = [g for g, s in enumerate(train) if s.id in judged]
    verdicts = {}
    if idx:
        model, tokenizer = load_policy(paths.base_model, device)  # served on loopback when judge.base_url is null
        asked = [(train[g].domain, groups[g]) for g in idx]
        verdicts = dict(zip(idx, judge_groups(judge, asked, paths.judge_cache, model, tokenizer, base_model.source)))

    components = heuristic_components(reward, encoder)
    labels = label_frame(train, groups, verdicts, reward, components)
    summary = {
        "scenarios": len(train),
        "gen_tokens_per_s": stats["gen_tokens_per_s"],
        **label_summary(labels, [c.name for c in components], verdicts),
    }
    log_metrics(summary)
    log_dict({f"{train[g].id}": v.__dict__ for g, v in verdicts.items()}, "judgements.json")
    if verdicts and summary["judge_fallback_rate"] > judge.max_fallback_rate:
        fallback = sum(v.source == "fallback" for v in verdicts.values())
        raise ValueError(
            f"judge fallback rate {summary['judge_fallback_rate']:.2f} ({fallback} of {len(verdicts)} "
            f"groups) is above judge.max_fallback_rate {judge.max_fallback_rate}; the judge's errors are "
            "in the MLflow run's judgements.json. Labels were not written."
        )
    with atomic_path(paths.labels) as tmp:
        labels.to_parquet(tmp, index=False)
    write_json(f"{paths.metrics}/label.json", summary)
    return summary


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("label")
