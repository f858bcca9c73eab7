"""Stage 6, evaluate: trained policy against the base and against the current champion, on the
held-out scenarios.

All policies see the same scenarios, the same scripted users and the same sampling seed, and are
scored by the same composite reward. Reported (`paths.metrics`/eval.json, DVC metrics, and MLflow):
mean composite reward and each component, paired bootstrap CIs of trained - base and trained -
champion over scenarios, judge win rates of trained against each (ties and unjudged pairs counted),
reply length, the KL of trained from base on its own samples, and a per-domain breakdown. A run
whose reward rises while the judge prefers the base (over at least `evaluate.min_judged` judged
pairs), or whose reply length drifts past `evaluate.max_length_ratio`, is flagged, and a flagged
version cannot be promoted. Also writes
`paths.plots`/eval.csv and a markdown report (`paths.metrics`/eval.md) with the comparison table
and side-by-side examples, which the Prefect flow publishes as an artifact.
"""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pandas as pd
import torch

from grpo import scenarios as S
from grpo.evaluation import hacking_flags, paired_bootstrap_ci, policy_kl, win_rate
from grpo.io import atomic_path, write_json
from grpo.models import load_causal_lm, load_tokenizer, pick_device
from grpo.rewards import words
from grpo.rollout import ConversationEnvironment, rollout_in_chunks
from tasks.common import cli, log_metrics, setup_mlflow, stage_run
from tasks.scoring import load_reward, run_judge


def champion_policy(params: dict, dest: str) -> tuple[str | None, str | None]:
    """(local policy dir, version) of the registered champion, or (None, None) if there is none."""
    from tasks.registry import by_alias, download_policy

    mlflow = setup_mlflow(params)
    name = params["register"]["model_name"]
    champion = by_alias(mlflow.MlflowClient(), name, "champion")
    if champion is None:
        return None, None
    return download_policy(mlflow, name, str(champion.version), dest), str(champion.version)


def rollouts(model, tok, scenarios, params: dict, name: str, user_model):
    """Every policy meets the same users: the same seed and, with `rollout.user: llm`, the base model."""
    env = ConversationEnvironment(tok, **params["rollout"])
    torch.manual_seed(params["seed"])
    return rollout_in_chunks(env, model, scenarios, params["evaluate"]["samples_per_scenario"], len(scenarios),
                             desc=f"eval {name}", user_model=user_model)


def score(trajs, scenarios, reward) -> pd.DataFrame:
    """One row per scenario: composite reward, raw components and reply length, over the samples."""
    rows = []
    for g, scen in enumerate(scenarios):
        group = [t.messages for t in trajs if t.group == g]
        total, raw = reward(group, scen)
        replies = [m["content"] for c in group for m in c if m["role"] == "assistant"]
        rows.append({"scenario_id": scen.id, "domain": scen.domain, "reward": float(np.mean(total)),
                     **{k: float(np.mean(v)) for k, v in raw.items()},
                     "reply_words": float(np.mean([len(words(r)) for r in replies])), "example": group[0]})
    return pd.DataFrame(rows)


def judge_pairs(params, model, tok, scenarios, ours, theirs) -> dict:
    """Judge trained against another policy on up to `evaluate.judge_scenarios` scenarios, one pair
    each, in a seeded random order so neither side is always shown first."""
    n = params["evaluate"]["judge_scenarios"]
    if not params["judge"]["enabled"] or not n:
        return win_rate([])
    rng = random.Random(params["seed"])
    picked = [i for i, s in enumerate(scenarios) if s.id in {x.id for x in S.subsample(scenarios, n, params["seed"])}]
    flips = [rng.random() < 0.5 for _ in picked]
    groups = [(scenarios[i].domain, [theirs.example[i], ours.example[i]] if f else [ours.example[i], theirs.example[i]])
              for i, f in zip(picked, flips)]
    return win_rate(run_judge(params, model, tok, groups), [int(f) for f in flips])


def means(df: pd.DataFrame, comps: list[str]) -> dict:
    return {"reward_mean": float(df["reward"].mean()), "reply_words": float(df["reply_words"].mean()),
            **{k: float(df[k].mean()) for k in comps}}


def report_markdown(result: dict, tables: dict[str, pd.DataFrame], comps: list[str], n_examples: int = 3) -> str:
    names = list(tables)
    lines = [f"# Evaluation on {result['scenarios']} held-out scenarios", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in ["reward_mean", "reply_words", *comps]:
        lines.append(f"| {k} | " + " | ".join(f"{result[n][k]:.3f}" for n in names) + " |")
    lines += [""]
    for other in ("base", "champion"):
        d = result.get(f"vs_{other}")
        if d:
            w = result["judge"][f"vs_{other}"]
            lines.append(f"- trained - {other}: {d['mean']:+.3f}, {int(d['level'] * 100)}% CI [{d['ci_low']:+.3f}, "
                         f"{d['ci_high']:+.3f}]; judge: {w['wins']} wins, {w['losses']} losses, {w['ties']} ties, "
                         f"{w['unjudged']} unjudged")
    lines += [f"- KL(trained || base) per agent token: {result['kl_trained_base']:.4f}",
              f"- flagged: {'yes: ' + '; '.join(result['flags']) if result['flagged'] else 'no'}", "",
              "## Per domain (mean reward)", "", "| domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for dom, row in result["per_domain"].items():
        lines.append(f"| {dom} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    lines += ["", "## Examples", ""]
    for i in range(min(n_examples, len(tables["trained"]))):
        lines.append(f"### {tables['trained'].scenario_id[i]}")
        for n in names:
            conv = tables[n].example[i]
            lines.append(f"**{n}** (reward {tables[n].reward[i]:+.2f})\n")
            lines += [f"> *{m['role']}*: {m['content']}  " for m in conv if m["role"] != "system"]
            lines.append("")
    return "\n".join(lines)


def run(params: dict) -> dict:
    paths, p = params["paths"], params["evaluate"]
    with stage_run("evaluate", params, ("evaluate", "rollout", "reward", "judge", "seed")) as (mlflow, _), \
            tempfile.TemporaryDirectory() as tmp:
        scenarios = S.subsample(S.from_frame(pd.read_parquet(f"{paths['prepared']}/eval.parquet")), p["max_scenarios"], params["seed"])
        reward = load_reward(params)
        device = pick_device(params["device"])
        tok = load_tokenizer(paths["base_model"])
        base_model = load_causal_lm(paths["base_model"], device)
        trained_model = load_causal_lm(paths["policy"], device)
        trajs = {"base": rollouts(base_model, tok, scenarios, params, "base", base_model),
                 "trained": rollouts(trained_model, tok, scenarios, params, "trained", base_model)}
        champion_dir, champion_version = champion_policy(params, tmp)
        if champion_dir:
            champion_model = load_causal_lm(champion_dir, device)
            trajs["champion"] = rollouts(champion_model, load_tokenizer(champion_dir), scenarios, params,
                                         f"champion v{champion_version}", base_model)
            del champion_model
        tables = {k: score(v, scenarios, reward) for k, v in trajs.items()}
        comps = [c for c in tables["base"].columns if c not in ("scenario_id", "domain", "reward", "reply_words", "example")]

        result = {k: means(t, comps) for k, t in tables.items()}
        result.update(scenarios=len(scenarios), samples_per_scenario=p["samples_per_scenario"], champion_version=champion_version,
                      kl_trained_base=policy_kl(trained_model, base_model, trajs["trained"], tok.pad_token_id), judge={})
        for other in [k for k in tables if k != "trained"]:
            result[f"vs_{other}"] = paired_bootstrap_ci(tables[other]["reward"], tables["trained"]["reward"],
                                                        p["bootstrap"], p["ci_level"], params["seed"])
            result["judge"][f"vs_{other}"] = judge_pairs(params, base_model, tok, scenarios, tables["trained"], tables[other])
        result["per_domain"] = {d: {k: float(t.loc[t["domain"] == d, "reward"].mean()) for k, t in tables.items()}
                                for d in sorted(set(tables["base"]["domain"]))}
        length_ratio = result["trained"]["reply_words"] / max(result["base"]["reply_words"], 1e-9)
        result["flags"] = hacking_flags(result["vs_base"]["mean"], result["judge"]["vs_base"], p["max_length_ratio"],
                                        length_ratio, p["min_judged"])
        if "champion" in tables:
            result["flags"] += [f"against the champion: {f}" for f in hacking_flags(
                result["vs_champion"]["mean"], result["judge"]["vs_champion"], p["max_length_ratio"], min_judged=p["min_judged"])]
        result["flagged"] = bool(result["flags"])

        markdown = report_markdown(result, tables, comps)
        write_json(f"{paths['metrics']}/eval.json", result)
        with atomic_path(f"{paths['metrics']}/eval.md") as f:
            f.write_text(markdown)
        table = tables["base"][["scenario_id", "domain"]].copy()
        for k, t in tables.items():
            table = table.join(t.drop(columns=["scenario_id", "domain", "example"]).add_suffix(f"_{k}"))
        with atomic_path(f"{paths['plots']}/eval.csv") as f:
            table.to_csv(f, index=False)
        for k in tables:
            log_metrics(mlflow, {f"{k}.{m}": v for m, v in result[k].items()})
        for k in [k for k in result if k.startswith("vs_")]:
            log_metrics(mlflow, {f"{k}.{m}": v for m, v in result[k].items()})
            log_metrics(mlflow, {f"judge.{k}.{m}": v for m, v in result["judge"][k].items()})
        log_metrics(mlflow, {"kl_trained_base": result["kl_trained_base"], "flagged": int(result["flagged"]),
                             **{f"domain.{d}.{k}": v for d, row in result["per_domain"].items() for k, v in row.items()}})
        mlflow.log_table(table, "eval_table.json")
        mlflow.log_text(markdown, "eval.md")
    d = result["vs_base"]
    return {"base": result["base"]["reward_mean"], "trained": result["trained"]["reward_mean"], "diff": d["mean"],
            "ci_low": d["ci_low"], "ci_high": d["ci_high"], "champion_version": champion_version, "flagged": result["flagged"]}


if __name__ == "__main__":
    cli(run)
