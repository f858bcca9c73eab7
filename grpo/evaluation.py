"""Comparing policies on the same scenarios: per-scenario scores, paired bootstrap CIs, judge win
rates, reward-hacking flags, the KL between two policies, and the comparison report."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch

from grpo.config import EvaluateConfig
from grpo.rewards import words
from grpo.scenarios import subsample

# Per-scenario columns that are not reward components: tool use is summed over a scenario's samples
# (``calls``, ``calls_ok``, ``called``: episodes with a call) and summarised by :func:`means`.
NON_COMPONENTS = (
    "scenario_id",
    "domain",
    "reward",
    "reply_words",
    "example",
    "has_tools",
    "called",
    "calls",
    "calls_ok",
    "calls_malformed",
)


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired units (scenarios) with a percentile bootstrap CI."""
    diff = np.asarray(b, float) - np.asarray(a, float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": int(len(diff))}


def win_rate(verdicts, first: int | list[int] = 0, swapped=None) -> dict:
    """Judge verdicts on pairs: wins/losses/ties of conversation ``first`` (0 or 1; or one per
    verdict) against the other one. With ``swapped``, the same pairs judged in the other order, a
    pair's scores are the means over both orders, which cancels a preference for a position, and
    ``position_consistency`` is the share of pairs answered both ways that got the same winner both
    ways (ties included). Pairs the judge could not answer at all are ``unjudged``; the rate is
    (wins + ties / 2) over judged pairs, NaN when none was judged."""
    firsts = first if isinstance(first, list) else [first] * len(verdicts)
    swapped = swapped or [None] * len(verdicts)
    wins = losses = ties = unjudged = both = consistent = 0
    for v, w, f in zip(verdicts, swapped, firsts):
        sides = [(v.scores[f], v.scores[1 - f])] if v.scores is not None else []
        sides += [(w.scores[1 - f], w.scores[f])] if w is not None and w.scores is not None else []
        if not sides:
            unjudged += 1
            continue
        if len(sides) == 2:
            both += 1
            consistent += np.sign(sides[0][0] - sides[0][1]) == np.sign(sides[1][0] - sides[1][1])
        a, b = np.mean([x for x, _ in sides]), np.mean([y for _, y in sides])
        wins, losses, ties = wins + (a > b), losses + (a < b), ties + (a == b)
    judged = wins + losses + ties
    return {
        "wins": int(wins),
        "losses": int(losses),
        "ties": int(ties),
        "unjudged": unjudged,
        "win_rate": (wins + ties / 2) / judged if judged else float("nan"),
        "position_consistency": consistent / both if both else float("nan"),
    }


def hacking_flags(
    reward_diff: float,
    win: dict,
    max_length_ratio: float,
    length_ratio: float | None = None,
    min_judged: int = 1,
    alpha: float = 0.05,
) -> list[str]:
    """Reasons to distrust a reward gain: the reward rose while the judge preferred the other policy
    (over at least ``min_judged`` judged pairs, fewer losses than wins is not enough: a one-sided
    sign test over the decisive pairs must reject "no preference" at ``alpha``, so 0 wins and 2
    losses among 6 ties, p = 0.25, is not evidence), or the reply length drifted past
    ``max_length_ratio`` either way."""
    from scipy.stats import binomtest

    flags = []
    rate = win.get("win_rate", float("nan"))
    wins, losses = win.get("wins", 0), win.get("losses", 0)
    judged = wins + losses + win.get("ties", 0)
    if reward_diff > 0 and judged >= min_judged and losses > wins:
        p = binomtest(wins, wins + losses, 0.5, alternative="less").pvalue
        if p < alpha:
            flags.append(
                f"reward rose ({reward_diff:+.3f}) while the judge win rate is {rate:.2f} "
                f"({wins} wins, {losses} losses: sign test p {p:.3f})"
            )
    if length_ratio is not None and not 1 / max_length_ratio <= length_ratio <= max_length_ratio:
        flags.append(f"reply length changed by a factor of {length_ratio:.2f} (bound {max_length_ratio})")
    return flags


def score(trajectories, scenarios: list, reward) -> pd.DataFrame:
    """One row per scenario: composite reward, raw components and reply length, averaged over the
    scenario's samples, and its first conversation as ``example``."""
    rows = []
    for g, scen in enumerate(scenarios):
        episodes = [t for t in trajectories if t.group == g]
        group = [t.messages for t in episodes]
        total, raw = reward(group, scen)
        replies = [m["content"] for c in group for m in c if m["role"] == "assistant"]
        rows.append(
            {
                "scenario_id": scen.id,
                "domain": scen.domain,
                "reward": float(np.mean(total)),
                **{k: float(np.mean(v)) for k, v in raw.items()},
                "reply_words": float(np.mean([len(words(r)) for r in replies])),
                "has_tools": bool(scen.tools),
                "called": float(np.mean([t.tool_calls > 0 for t in episodes])),
                "calls": sum(t.tool_calls for t in episodes),
                "calls_ok": sum(t.tool_calls - t.tool_errors for t in episodes),
                "calls_malformed": sum(t.tool_malformed for t in episodes),
                "example": group[0],
            }
        )
    return pd.DataFrame(rows)


def components(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in NON_COMPONENTS]


def means(table: pd.DataFrame) -> dict:
    """Mean reward, reply length and components; ``tool_call_rate``: the share of episodes on
    scenarios with tools that made a call; ``tool_success`` and ``tool_malformed``: the shares of
    all calls that succeeded and that were not a well-formed call (NaN without calls)."""
    tools = table[table["has_tools"]]
    calls = table["calls"].sum()
    return {
        "reward_mean": float(table["reward"].mean()),
        "reply_words": float(table["reply_words"].mean()),
        "tool_call_rate": float(tools["called"].mean()) if len(tools) else float("nan"),
        "tool_success": float(table["calls_ok"].sum() / calls) if calls else float("nan"),
        "tool_malformed": float(table["calls_malformed"].sum() / calls) if calls else float("nan"),
        **{k: float(table[k].mean()) for k in components(table)},
    }


def pairs_to_judge(scenarios: list, ours: pd.DataFrame, theirs: pd.DataFrame, n: int, seed: int):
    """``(groups, flips)``: one ``(domain, [conversation, conversation])`` pair on each of ``n``
    scenarios (a fixed, domain-balanced subset), ours shown second where ``flips`` is 1, in a
    seeded random order so neither side is always shown first."""
    rng = random.Random(seed)
    chosen = {s.id for s in subsample(scenarios, n, seed)}
    picked = [i for i, s in enumerate(scenarios) if s.id in chosen]
    flips = [int(rng.random() < 0.5) for _ in picked]
    groups = [
        (scenarios[i].domain, [theirs.example[i], ours.example[i]] if f else [ours.example[i], theirs.example[i]])
        for i, f in zip(picked, flips)
    ]
    return groups, flips


def versus(tables: dict[str, pd.DataFrame], config: EvaluateConfig, seed: int) -> dict:
    """``vs_<name>``: the paired bootstrap CI of trained - each other policy, over scenarios."""
    trained = tables["trained"]["reward"].to_numpy()
    return {
        f"vs_{k}": paired_bootstrap_ci(t["reward"].to_numpy(), trained, config.bootstrap, config.ci_level, seed)
        for k, t in tables.items()
        if k != "trained"
    }


def compare_extra(tables: dict[str, pd.DataFrame], config: EvaluateConfig, seed: int, excluded: int) -> dict:
    """The result on an extra held-out set: each policy's means (``similarity`` is to the set's
    reference replies), trained against each other policy, and how many of the set's rows were
    left out because training used them."""
    return {
        **{k: means(t) for k, t in tables.items()},
        **versus(tables, config, seed),
        "scenarios": len(tables["trained"]),
        "excluded_training_rows": excluded,
    }


def compare(
    tables: dict[str, pd.DataFrame],
    judge: dict[str, dict],
    kl_trained_base: float,
    config: EvaluateConfig,
    seed: int,
    champion_version: str | None = None,
    judge_agreement: float = float("nan"),
) -> dict:
    """The evaluation result (eval.json): each policy's means, trained against each other policy
    (``vs_<name>``: paired bootstrap CI over scenarios; ``judge[vs_<name>]``: win rate, for base and
    champion), the per-domain breakdown and the reward-hacking flags. ``tables`` holds ``base`` and ``trained``,
    ``sft`` (the SFT policy GRPO started from) and ``champion`` when there are such. The judge's
    win rates count in the flags only when its ``judge_agreement`` with the heuristic (label's)
    reaches ``config.min_judge_agreement``."""
    trained = tables["trained"]
    result = {k: means(t) for k, t in tables.items()}
    result.update(
        scenarios=len(trained),
        samples_per_scenario=config.samples_per_scenario,
        champion_version=champion_version,
        kl_trained_base=kl_trained_base,
        judge=judge,
        judge_agreement=judge_agreement,
        judge_trusted=bool(judge_agreement >= config.min_judge_agreement),  # NaN (never measured): not trusted
    )
    heard = judge if result["judge_trusted"] else {k: {} for k in judge}
    result.update(versus(tables, config, seed))
    result["per_domain"] = {
        d: {k: float(t.loc[t["domain"] == d, "reward"].mean()) for k, t in tables.items()}
        for d in sorted(set(trained["domain"]))
    }
    # per domain: each policy's tool use, and trained against each other policy (paired CIs)
    result["per_domain_tools"] = {}
    result["per_domain_vs"] = {}
    for d in sorted(set(trained["domain"])):
        rows = (trained["domain"] == d).to_numpy()
        result["per_domain_tools"][d] = {
            k: {m: v for m, v in means(t[rows]).items() if m in ("tool_call_rate", "tool_success")}
            for k, t in tables.items()
        }
        result["per_domain_vs"][d] = versus({k: t[rows] for k, t in tables.items()}, config, seed)
    length_ratio = result["trained"]["reply_words"] / max(result["base"]["reply_words"], 1e-9)
    result["flags"] = hacking_flags(
        result["vs_base"]["mean"],
        heard["vs_base"],
        config.max_length_ratio,
        length_ratio,
        config.min_judged,
        config.judge_alpha,
    )
    if "champion" in tables:
        result["flags"] += [
            f"against the champion: {f}"
            for f in hacking_flags(
                result["vs_champion"]["mean"],
                heard["vs_champion"],
                config.max_length_ratio,
                min_judged=config.min_judged,
                alpha=config.judge_alpha,
            )
        ]
    result["flagged"] = bool(result["flags"])
    return result


def side_by_side(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per scenario with every policy's columns suffixed by its name (eval.csv)."""
    table = tables["base"][["scenario_id", "domain"]].copy()
    for k, t in tables.items():
        table = table.join(t.drop(columns=["scenario_id", "domain", "example"]).add_suffix(f"_{k}"))
    return table


def ci_line(result: dict, other: str) -> str:
    """``trained - base: +0.110, 95% CI [+0.030, +0.199]; judge 3W/1L/0T, 4 unjudged, same winner in
    both orders 75%`` (the judge's part where it has a verdict for the pair; the last part where some
    pair was answered in both orders)"""
    d, w = result[f"vs_{other}"], result["judge"].get(f"vs_{other}")
    line = f"trained - {other}: {d['mean']:+.3f}, {int(d['level'] * 100)}% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    if w is None:  # a pair the judge is not asked about (trained against SFT)
        return line
    consistency = w.get("position_consistency", float("nan"))
    return f"{line}; judge {w['wins']}W/{w['losses']}L/{w['ties']}T, {w['unjudged']} unjudged" + (
        "" if np.isnan(consistency) else f", same winner in both orders {consistency:.0%}"
    )


def report_markdown(result: dict, tables: dict[str, pd.DataFrame], n_examples: int = 3) -> str:
    """The evaluation report: comparison table, CIs and judge results, per-domain means and a few
    side-by-side example conversations."""
    names = list(tables)
    lines = [
        f"# Evaluation on {result['scenarios']} held-out scenarios",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in [
        "reward_mean",
        "reply_words",
        "tool_call_rate",
        "tool_success",
        "tool_malformed",
        *components(tables["base"]),
    ]:
        lines.append(f"| {k} | " + " | ".join(f"{result[n][k]:.3f}" for n in names) + " |")
    lines += [""]
    lines += [f"- {ci_line(result, other)}" for other in ("base", "sft", "champion") if result.get(f"vs_{other}")]
    lines += [
        f"- judge: agreement with the heuristic in label {result['judge_agreement']:.2f}, "
        + ("trusted" if result["judge_trusted"] else "not trusted: its win rates flag nothing"),
        f"- KL(trained || base) per agent token: {result['kl_trained_base']:.4f}",
        f"- flagged: {'yes: ' + '; '.join(result['flags']) if result['flagged'] else 'no'}",
        "",
        "## Per domain (mean reward)",
        "",
        "| domain | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for dom, row in result["per_domain"].items():
        lines.append(f"| {dom} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    for name, r in result.get("extra_sets", {}).items():
        shown = [n for n in names if n in r]
        lines += [
            "",
            f"## {name}: {r['scenarios']} imported held-out scenarios ({r['excluded_training_rows']} rows left out: "
            "in the train set)",
            "",
            "| metric | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for k in ("reward_mean", "similarity", "reply_words"):
            lines.append(f"| {k} | " + " | ".join(f"{r[n].get(k, float('nan')):.3f}" for n in shown) + " |")
        lines += [""] + [
            f"- trained - {o}: {d['mean']:+.3f}, {int(d['level'] * 100)}% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            for o in shown
            if (d := r.get(f"vs_{o}"))
        ]
    lines += ["", "## Examples", ""]
    for i in range(min(n_examples, len(tables["trained"]))):
        lines.append(f"### {tables['trained'].scenario_id[i]}")
        for n in names:
            lines.append(f"**{n}** (reward {tables[n].reward[i]:+.2f})\n")
            lines += [f"> *{m['role']}*: {m['content']}  " for m in tables[n].example[i] if m["role"] != "system"]
            lines.append("")
    return "\n".join(lines)


@torch.no_grad()
def policy_kl(policy, reference, trajectories, pad_id: int, temperature: float = 1.0, batch_size: int = 8) -> float:
    """Monte Carlo KL(policy || reference) per agent token: the mean over the policy's own sampled
    agent tokens of log p_policy - log p_reference, both at the ``temperature`` they were sampled at
    (the estimate is unbiased only under the distribution that drew the samples)."""
    from grpo.objective import token_logprobs
    from grpo.trainer import pad_batch

    device = next(policy.parameters()).device
    total = tokens = 0.0
    for i in range(0, len(trajectories), batch_size):
        ids, attn, mask, start = pad_batch(trajectories[i : i + batch_size], pad_id, device)
        diff = token_logprobs(policy, ids, attn, start, temperature=temperature) - token_logprobs(
            reference, ids, attn, start, temperature=temperature
        )
        total += float((diff * mask).sum())
        tokens += float(mask.sum())
    return total / max(tokens, 1.0)
