"""Stage 7, evaluate: trained policy against the base, the SFT policy it started from (when
`sft.enabled`) and the current champion, on the held-out scenarios.

All policies see the same scenarios, the same scripted users and the same sampling seed, and are
scored by the same composite reward. Reported (`paths.metrics`/eval.json, DVC metrics, and MLflow):
mean composite reward and each component; the tool-call rate on scenarios with tools and the
share of calls that succeeded, overall and per domain; paired bootstrap CIs over scenarios of
trained - base, trained - sft (what GRPO added on top of SFT) and trained - champion, overall and
per domain; judge win rates of trained against the base and the champion (each pair judged in both
orders; ties and unjudged pairs counted; position consistency); reply length; the KL of trained
from base on its own samples. A run whose reward rises while the judge prefers the
base (at least `evaluate.min_judged` judged pairs, and a sign test at `evaluate.judge_alpha`), or whose reply length drifts past
`evaluate.max_length_ratio`, is flagged, and a flagged version cannot be promoted. The judge counts
only when its agreement with the heuristic in label (`paths.metrics`/label.json) reaches
`evaluate.min_judge_agreement`. Also writes `paths.plots`/eval.csv and a markdown report
(`paths.metrics`/eval.md) with the comparison table and side-by-side examples, which the Prefect
flow publishes as an artifact. The comparison itself is grpo/evaluation.py.

The champion compared against is the registry's, unless that champion is this very policy (a run
that promoted itself); then it is the version it replaced. That version is written to
`paths.champion`, a DVC dependency of this stage, so `dvc repro` re-evaluates when it moves
(mlflow_io/registry.py, `sync_champion`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from grpo import scenarios
from grpo.config import EvaluateConfig, ExtraSet, RolloutConfig, SFTConfig
from grpo.evaluation import (
    compare,
    compare_extra,
    pairs_to_judge,
    policy_kl,
    report_markdown,
    score,
    side_by_side,
    win_rate,
)
from grpo.imports import import_source
from grpo.io import atomic_path, read_json, write_json
from grpo.judge import judge_groups
from grpo.models import load_policy
from grpo.rewards import RewardConfig, load_composite
from grpo.rollout import RolloutJob, map_jobs
from grpo_agents.params import BaseModelParams, JudgeParams, Paths, RegisterParams
from mlflow_io.registry import download_policy, sync_champion
from mlflow_io.tracking import log_metrics, log_table, log_text

log = logging.getLogger(__name__)


def run(
    evaluate: EvaluateConfig,
    sft: SFTConfig,
    rollout: RolloutConfig,
    reward: RewardConfig,
    judge: JudgeParams,
    register: RegisterParams,
    seed: int,
    encoder: str,
    base_model: BaseModelParams,
    device: str,
    paths: Paths,
) -> dict:
    held_out = scenarios.from_frame(pd.read_parquet(f"{paths.prepared}/eval.parquet"))
    held_out = scenarios.subsample(held_out, evaluate.max_scenarios, seed)
    base, tokenizer = load_policy(paths.base_model, device)
    trained, _ = load_policy(paths.policy, device)
    composite = load_composite(reward, paths.calibration, paths.reward_model, encoder, base.device.type)
    policies = {"base": paths.base_model}
    if sft.enabled:  # SFT only, against which trained shows what GRPO added
        policies["sft"] = paths.sft_model
    policies["trained"] = paths.policy
    champion_version = sync_champion(MlflowClient(), register.model_name, paths)
    extra = {
        name: extra_scenarios(name, spec, f"{paths.prepared}/train.parquet", seed)
        for name, spec in evaluate.extra_sets.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        if champion_version:
            policies["champion"] = download_policy(register.model_name, champion_version, tmp)
        # Every policy meets the same users: the same seed and, with `rollout.user: llm`, the base
        # model. One job per policy and set; they may run side by side (grpo/rollout.py: map_jobs).
        sets = {None: held_out, **{name: chosen for name, (chosen, _) in extra.items()}}
        keys = [(on, k) for on in sets for k in policies if on is None or k != "champion"]  # extra sets: no champion
        jobs = [
            RolloutJob(
                f"eval {on or 'held-out'} {k}",
                policies[k],
                sets[on],
                evaluate.samples_per_scenario,
                rollout,
                seed,
                device,
                paths.base_model,
            )
            for on, k in keys
        ]
        results = {key: trajectories for key, (trajectories, _) in zip(keys, map_jobs(jobs, "evaluate"))}
    tables = {k: score(results[None, k], held_out, composite) for k in policies}
    extra = {
        name: compare_extra(
            {k: score(results[name, k], chosen, composite) for k in policies if k != "champion"},
            evaluate,
            seed,
            excluded,
        )
        for name, (chosen, excluded) in extra.items()
    }

    kl = policy_kl(trained, base, results[None, "trained"], tokenizer.pad_token_id, rollout.temperature)
    verdicts = {}
    # the judge guards trained against the base and the champion; against SFT the reward's CI tells
    for other in [k for k in tables if k not in ("trained", "sft")]:
        verdicts[f"vs_{other}"] = win_rate([])
        if judge.enabled and evaluate.judge_scenarios:
            groups, flips = pairs_to_judge(held_out, tables["trained"], tables[other], evaluate.judge_scenarios, seed)
            # each pair in both orders: the judge's preference for a position cancels out, and is measured
            both = groups + [(domain, pair[::-1]) for domain, pair in groups]
            answers = judge_groups(judge, both, paths.judge_cache, base, tokenizer, base_model.source)
            verdicts[f"vs_{other}"] = win_rate(answers[: len(groups)], flips, answers[len(groups) :])
    label = Path(paths.metrics, "label.json")
    agreement = read_json(label).get("judge_heuristic_pairwise", float("nan")) if label.exists() else float("nan")
    result = compare(tables, verdicts, kl, evaluate, seed, champion_version, agreement)
    result["extra_sets"] = extra
    if not result["judge_trusted"]:
        log.warning(
            "the judge's agreement with the heuristic in label is %.2f (evaluate.min_judge_agreement %.2f): "
            "its win rates are reported but flag nothing",
            agreement,
            evaluate.min_judge_agreement,
        )

    markdown = report_markdown(result, tables)
    table = side_by_side(tables)
    write_json(f"{paths.metrics}/eval.json", result)
    with atomic_path(f"{paths.metrics}/eval.md") as tmp:
        tmp.write_text(markdown)
    with atomic_path(f"{paths.plots}/eval.csv") as tmp:
        table.to_csv(tmp, index=False)
    for k in [*tables, *(k for k in result if k.startswith("vs_"))]:
        log_metrics({f"{k}.{m}": v for m, v in result[k].items()})
    for k, w in result["judge"].items():
        log_metrics({f"judge.{k}.{m}": v for m, v in w.items()})
    for name, r in extra.items():
        log_metrics({f"{name}.{k}.{m}": v for k, row in r.items() if isinstance(row, dict) for m, v in row.items()})
    log_metrics(
        {
            "kl_trained_base": kl,
            "flagged": int(result["flagged"]),
            **{f"domain.{d}.{k}": v for d, row in result["per_domain"].items() for k, v in row.items()},
        }
    )
    log_table(table, "eval_table.json")
    log_text(markdown, "eval.md")
    d = result["vs_base"]
    return {
        "base": result["base"]["reward_mean"],
        **({"sft": result["sft"]["reward_mean"], "diff_sft": result["vs_sft"]["mean"]} if "sft" in result else {}),
        "trained": result["trained"]["reward_mean"],
        "diff": d["mean"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "champion_version": champion_version,
        "flagged": result["flagged"],
    }


def extra_scenarios(name: str, spec: ExtraSet, train_file: str, seed: int) -> tuple[list, int]:
    """``(scenarios, rows left out)`` of an imported held-out set (`evaluate.extra_sets`), read
    through prepare's import path with PII masked. A row whose opening or id is in the train set is
    left out and counted: rows used for training are never evaluated."""
    raw, _ = import_source(spec.source, mask=False)
    masked, _ = import_source(spec.source, mask=True)
    train = pd.read_parquet(train_file, columns=["id", "opening"])
    used = set(train["opening"]) | set(train["id"])
    fresh = [m for r, m in zip(raw, masked) if not {r.opening, m.opening, r.id} & used]
    chosen = scenarios.subsample(fresh, spec.max_scenarios, seed)
    if not chosen:
        raise ValueError(f"evaluate.extra_sets.{name}: every row of {spec.source['path']} is in the train set")
    log.info(
        "extra set %s: %d scenarios; %d rows left out (in the train set)", name, len(chosen), len(raw) - len(fresh)
    )
    return chosen, len(raw) - len(fresh)


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("evaluate")
