"""Comparing policies on the same scenarios: paired bootstrap CIs, judge win rates, reward-hacking
flags and the KL between two policies."""

from __future__ import annotations

import numpy as np
import torch


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired units (scenarios) with a percentile bootstrap CI."""
    diff = np.asarray(b, float) - np.asarray(a, float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": int(len(diff))}


def win_rate(verdicts, first: int | list[int] = 0) -> dict:
    """Judge verdicts on pairs: wins/losses/ties of conversation ``first`` (0 or 1; or one per
    verdict) against the other one. Pairs the judge could not answer are counted as ``unjudged``;
    the rate is (wins + ties / 2) over judged pairs, NaN when none was judged."""
    firsts = first if isinstance(first, list) else [first] * len(verdicts)
    wins = losses = ties = unjudged = 0
    for v, f in zip(verdicts, firsts):
        if v.scores is None:
            unjudged += 1
            continue
        a, b = v.scores[f], v.scores[1 - f]
        wins, losses, ties = wins + (a > b), losses + (a < b), ties + (a == b)
    judged = wins + losses + ties
    return {"wins": wins, "losses": losses, "ties": ties, "unjudged": unjudged,
            "win_rate": (wins + ties / 2) / judged if judged else float("nan")}


def hacking_flags(reward_diff: float, win: dict, max_length_ratio: float, length_ratio: float | None = None,
                  min_judged: int = 1) -> list[str]:
    """Reasons to distrust a reward gain: the reward rose while the judge preferred the other policy
    (win rate below 0.5 over at least ``min_judged`` judged pairs; fewer are not evidence either
    way), or the reply length drifted past ``max_length_ratio`` either way."""
    flags = []
    rate = win.get("win_rate", float("nan"))
    judged = sum(win.get(k, 0) for k in ("wins", "losses", "ties"))
    if reward_diff > 0 and judged >= min_judged and rate < 0.5:
        flags.append(f"reward rose ({reward_diff:+.3f}) while the judge win rate is {rate:.2f}")
    if length_ratio is not None and not 1 / max_length_ratio <= length_ratio <= max_length_ratio:
        flags.append(f"reply length changed by a factor of {length_ratio:.2f} (bound {max_length_ratio})")
    return flags


@torch.no_grad()
def policy_kl(policy, reference, trajectories, pad_id: int, batch_size: int = 8) -> float:
    """Monte Carlo KL(policy || reference) per agent token: the mean over the policy's own sampled
    agent tokens of log p_policy - log p_reference."""
    from grpo.objective import token_logprobs
    from grpo.trainer import pad_batch

    device = next(policy.parameters()).device
    total = tokens = 0.0
    for i in range(0, len(trajectories), batch_size):
        ids, attn, mask, start = pad_batch(trajectories[i:i + batch_size], pad_id, device)
        diff = token_logprobs(policy, ids, attn, start) - token_logprobs(reference, ids, attn, start)
        total += float((diff * mask).sum())
        tokens += float(mask.sum())
    return total / max(tokens, 1.0)
