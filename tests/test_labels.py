"""Label rows: the judge's order on the heuristic's scale where it answered, the heuristic elsewhere,
and where each came from."""

import json
import math

import numpy as np
import pytest

from grpo.judge import Judgement
from grpo.labels import label_frame, label_summary, on_heuristic_scale
from grpo.rewards import RewardConfig
from grpo.scenarios import Scenario


class Length:
    """A stand-in heuristic component: the agent's reply length in characters / 10, capped at 1."""

    name = "length"

    def __call__(self, conversations, scenario=None):
        return np.array([min(1.0, len(c[-1]["content"]) / 10) for c in conversations])


def conv(reply: str) -> list[dict]:
    return [{"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": reply}]


SCENARIOS = [Scenario(id=f"s{i}", domain="sales", persona="p", goal="g", opening="Hi") for i in range(3)]
GROUPS = [[conv("Sure."), conv("Let me check that.")] for _ in SCENARIOS]
VERDICTS = {0: Judgement([0.9, 0.2], ["good", "bad"], "judge"), 1: Judgement(None, [], "fallback", error="no JSON")}
CONFIG = RewardConfig(weights={"length": 1.0})


def test_rows_take_the_judge_score_only_where_it_answered():
    labels = label_frame(SCENARIOS, GROUPS, VERDICTS, CONFIG, [Length()])
    assert len(labels) == 6 and list(labels["label_source"]) == ["judge"] * 2 + ["fallback"] * 2 + ["heuristic"] * 2
    # the judge's order (0.9 over 0.2) on the heuristic's scale (0.5 and 1.0: mean 0.75, spread 0.25)
    assert list(labels["score"][:2]) == pytest.approx([1.0, 0.5]) and list(labels["judge_score"][:2]) == [0.9, 0.2]
    assert list(labels["judge_note"][:2]) == ["good", "bad"]
    assert list(labels["score"][2:]) == pytest.approx([0.5, 1.0, 0.5, 1.0])  # heuristic: the length component
    assert labels["judge_score"][2:].isna().all() and labels["judge_note"][2] == "no JSON"
    assert json.loads(labels["conversation"][1]) == GROUPS[0][1]


def test_the_judges_scores_keep_their_order_and_take_the_heuristics_mean_and_spread():
    heuristic = np.array([0.52, 0.55, 0.60, 0.49])
    scaled = on_heuristic_scale([1.0, 0.0, 1.0, 0.5], heuristic)
    assert scaled.mean() == pytest.approx(heuristic.mean()) and scaled.std() == pytest.approx(heuristic.std())
    assert scaled[0] == scaled[2] > scaled[3] > scaled[1]
    assert on_heuristic_scale([0.7] * 4, heuristic) == pytest.approx([heuristic.mean()] * 4)  # all alike: a tie


def test_summary_counts_sources_and_rates():
    labels = label_frame(SCENARIOS, GROUPS, VERDICTS, CONFIG, [Length()])
    summary = label_summary(labels, ["length"], VERDICTS)
    assert summary["judge_groups"] == 2 and summary["judge_fallback_rate"] == 0.5
    assert (summary["label_source_judge"], summary["label_source_fallback"], summary["label_source_heuristic"]) == (
        2,
        2,
        2,
    )
    assert summary["length_mean"] == pytest.approx(0.75)
    # the judge ranks the short reply first, the heuristic the long one: full disagreement
    assert summary["judge_heuristic_pairwise"] == 0.0 and math.isclose(summary["judge_heuristic_spearman"], -1.0)
