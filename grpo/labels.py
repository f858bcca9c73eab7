"""Labels for the reward model: each sampled conversation's heuristic component scores and, where
the judge answered for its group, the judge's score (grpo/judge.py), with where the label came from."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from grpo.judge import Judgement
from grpo.reward_model import regression_metrics
from grpo.rewards import RewardConfig, aggregate, domain_weights
from grpo.scenarios import Scenario

SOURCES = ("judge", "fallback", "heuristic")


def label_frame(
    scenarios: list[Scenario],
    groups: list[list[list[dict]]],
    verdicts: dict[int, Judgement],
    reward: RewardConfig,
    components: list,
) -> pd.DataFrame:
    """One row per conversation: scenario, conversation JSON, each component's score, the weighted
    ``heuristic_score``, the ``judge_score`` (NaN where the judge gave none), ``score`` (where the
    judge answered, its scores on the heuristic's scale: :func:`on_heuristic_scale`; else the
    heuristic) and ``label_source``: ``judge``, ``fallback`` (the judge was asked and could not
    answer) or ``heuristic`` (not sent to the judge)."""
    rows = []
    for g, scen in enumerate(scenarios):
        scores = {c.name: c(groups[g], scen) for c in components}
        weights = {k: w for k, w in domain_weights(reward, scen.domain).items() if k in scores}
        heuristic = aggregate(scores, weights, reward.aggregate)
        v = verdicts.get(g)
        source = "heuristic" if v is None else v.source
        judged = on_heuristic_scale(v.scores, heuristic) if source == "judge" else None
        for k, conv in enumerate(groups[g]):
            judge_score = v.scores[k] if v is not None and v.scores else float("nan")
            rows.append(
                {
                    "scenario_id": scen.id,
                    "domain": scen.domain,
                    "sample": k,
                    "conversation": json.dumps(conv),
                    **{c: float(s[k]) for c, s in scores.items()},
                    "heuristic_score": float(heuristic[k]),
                    "judge_score": judge_score,
                    "score": float(judged[k]) if judged is not None else float(heuristic[k]),
                    "label_source": source,
                    "judge_note": (v.explanations[k] if v and v.scores else (v.error if v else "")),
                }
            )
    return pd.DataFrame(rows)


def on_heuristic_scale(judge: list[float], heuristic) -> np.ndarray:
    """A group's judge scores moved onto its heuristic scores' scale: the heuristic's mean and
    spread in the group, in the judge's order (a judge that scores the group all alike leaves each
    conversation at the group's heuristic mean).

    The judge scores a group relative to itself (RULER-style), on a 0-1 scale it uses in large
    steps (on the default, judged groups had mean 0.84 and spread 0.37, against 0.54 and 0.08 for
    the heuristic). Taken as they are, the reward model would have to learn which groups were
    judged; it could not, and its held-out Spearman fell to -0.04 (0.82 with this, on the same
    labels)."""
    j, h = np.asarray(judge, dtype=float), np.asarray(heuristic, dtype=float)
    z = (j - j.mean()) / j.std() if j.std() > 0 else np.zeros_like(j)
    return h.mean() + h.std() * z


def label_summary(labels: pd.DataFrame, component_names: list[str], verdicts: dict[int, Judgement]) -> dict:
    """Label statistics, the judge's fallback and repair rates, and, where the judge answered, how
    well the heuristic agrees with it (Spearman and pairwise accuracy within groups)."""
    judged = len(verdicts)
    fallback = sum(v.source == "fallback" for v in verdicts.values())
    summary = {
        "labels": len(labels),
        "score_mean": labels["score"].mean(),
        "score_std": labels["score"].std(),
        **{f"{c}_mean": labels[c].mean() for c in component_names},
        "judge_groups": judged,
        "judge_fallback_rate": fallback / judged if judged else 0.0,
        "judge_repair_rate": sum(v.repaired for v in verdicts.values()) / judged if judged else 0.0,
        **{f"label_source_{s}": int((labels["label_source"] == s).sum()) for s in SOURCES},
    }
    ok = labels[labels["label_source"] == "judge"]
    if len(ok) > 1:
        agree = regression_metrics(
            ok["heuristic_score"].to_numpy(),
            ok["judge_score"].to_numpy(),
            ok["scenario_id"].to_numpy(),
            float(ok["judge_score"].mean()),
        )
        summary.update(judge_heuristic_spearman=agree["spearman"], judge_heuristic_pairwise=agree["pairwise_accuracy"])
    return summary
