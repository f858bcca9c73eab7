import numpy as np
import pytest

from grpo.evaluation import hacking_flags, paired_bootstrap_ci, policy_kl, win_rate


def test_paired_bootstrap_ci_brackets_the_mean_and_detects_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    res = paired_bootstrap_ci(a, a + 1.0 + rng.normal(scale=0.1, size=50))
    assert res["ci_low"] < res["mean"] < res["ci_high"] and res["ci_low"] > 0.8
    null = paired_bootstrap_ci(a, a + rng.normal(scale=0.5, size=50))
    assert null["ci_low"] < 0 < null["ci_high"]
    assert paired_bootstrap_ci(a, a + 1, seed=3) == paired_bootstrap_ci(a, a + 1, seed=3)


def test_win_rate_counts_ties_and_unjudged_pairs():
    from grpo.judge import Judgement

    v = lambda s: Judgement(s, [], "judge" if s else "fallback")
    verdicts = [v([0.9, 0.1]), v([0.2, 0.8]), v([0.5, 0.5]), v(None), v([0.7, 0.3])]
    once = win_rate(verdicts)
    assert {k: once[k] for k in ("wins", "losses", "ties", "unjudged", "win_rate")} == {
        "wins": 2,
        "losses": 1,
        "ties": 1,
        "unjudged": 1,
        "win_rate": 2.5 / 4,
    }
    assert np.isnan(once["position_consistency"])  # no pair was judged both ways
    assert win_rate(verdicts, first=1)["wins"] == 1
    per_pair = win_rate(verdicts, first=[0, 1, 0, 0, 1])  # the order each pair was shown in
    assert (per_pair["wins"], per_pair["losses"], per_pair["ties"]) == (2, 1, 1)
    assert np.isnan(win_rate([v(None)])["win_rate"])


def test_both_orders_cancel_a_position_bias_and_measure_it():
    from grpo.judge import Judgement

    v = lambda s: Judgement(s, [], "judge" if s else "fallback")
    # pair 1: ours wins shown first (0.7 vs 0.4) but loses shown second (0.5 vs 0.6): the means, 0.6
    # against 0.5, still favour ours, and the order changed the verdict; pair 2 was answered one way only
    both = win_rate([v([0.7, 0.4]), v([0.7, 0.4])], 0, [v([0.6, 0.5]), v(None)])
    assert (both["wins"], both["losses"], both["ties"], both["unjudged"]) == (2, 0, 0, 0)
    assert both["position_consistency"] == 0.0  # the one pair seen both ways flipped with the order
    steady = win_rate([v([0.7, 0.4]), v([0.6, 0.5])], 0, [v([0.5, 0.6]), v([0.4, 0.7])])
    assert steady["wins"] == 2 and steady["position_consistency"] == 1.0


def test_hacking_flags():
    losing = {"wins": 0, "losses": 6, "ties": 0, "win_rate": 0.0}
    assert hacking_flags(0.3, {"wins": 3, "losses": 1, "ties": 0, "win_rate": 0.75}, 1.5, 1.1) == []
    assert "judge win rate is 0.00 (0 wins, 6 losses: sign test p 0.016)" in hacking_flags(0.3, losing, 1.5, 1.0)[0]
    assert hacking_flags(0.3, losing, 1.5, 1.0, min_judged=7) == []  # six verdicts are not enough evidence
    assert hacking_flags(0.3, losing, 1.5, 1.0, alpha=0.01) == []  # p 0.016 is not below 0.01
    # the default run's judge: 0 wins, 2 losses, 6 ties; a win rate of 0.38, but p 0.25: no evidence
    assert hacking_flags(0.3, {"wins": 0, "losses": 2, "ties": 6, "win_rate": 0.375}, 1.5, 1.0, min_judged=5) == []
    assert hacking_flags(0.3, {"wins": 1, "losses": 3, "ties": 0, "win_rate": 0.25}, 1.5, 1.0) == []  # p 0.31
    assert hacking_flags(-0.3, losing, 1.5) == []  # reward fell too: nothing hidden
    assert hacking_flags(0.3, {"win_rate": float("nan")}, 1.5) == []  # no judge verdicts: not assessable
    assert "factor of 2.00" in hacking_flags(0.3, {}, 1.5, 2.0)[0] and hacking_flags(0.3, {}, 1.5, 0.5)


def test_policy_kl_is_zero_against_itself_and_positive_against_another(tiny_model, tokenizer):
    import torch

    from grpo.config import RolloutConfig
    from grpo.models import tiny_causal_lm
    from grpo.rollout import ConversationEnvironment
    from grpo.scenarios import Scenario

    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=6))
    scen = [Scenario(id="a", domain="sales", persona="p", goal="g", opening="Which plan?")]
    torch.manual_seed(0)
    trajs = env.rollout(tiny_model, scen, 4)
    assert policy_kl(tiny_model, tiny_model, trajs, tokenizer.pad_token_id) == pytest.approx(0.0, abs=1e-5)
    other = tiny_causal_lm(tokenizer, seed=1)
    assert policy_kl(tiny_model, other, trajs, tokenizer.pad_token_id) > 0.01


def tables(trained_shift: float, n: int = 8) -> dict:
    import pandas as pd

    def table(shift: float, words: float, called: float = 0.5) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "scenario_id": [f"s{i}" for i in range(n)],
                "domain": ["sales", "tutoring"] * (n // 2),
                "reward": [0.1 * i + shift for i in range(n)],
                "empathy": [0.5] * n,
                "reply_words": [words] * n,
                "has_tools": [i < n // 2 for i in range(n)],  # the first half has tools
                "called": [called if i < n // 2 else 0.0 for i in range(n)],
                "calls": [2 * called if i < n // 2 else 0 for i in range(n)],  # two samples a scenario
                "calls_ok": [1 if i == 0 and called else 0 for i in range(n)],
                "calls_malformed": [1 if i == 1 and called else 0 for i in range(n)],
                "example": [
                    [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(n)
                ],
            }
        )

    return {"base": table(0.0, 10.0, called=0.0), "trained": table(trained_shift, 12.0)}


def evaluate_config(ci_level: float):
    from grpo.config import EvaluateConfig

    return EvaluateConfig(
        max_scenarios=None,
        judge_scenarios=2,
        min_judged=2,
        max_length_ratio=1.5,
        min_judge_agreement=0.6,
        samples_per_scenario=1,
        bootstrap=200,
        ci_level=ci_level,
    )


def test_compare_reports_means_cis_domains_and_flags():
    from grpo.evaluation import compare

    config = evaluate_config(ci_level=0.9)
    judge = {"vs_base": {"wins": 0, "losses": 6, "ties": 0, "unjudged": 0, "win_rate": 0.0}}
    result = compare(tables(0.2), judge, 0.01, config, seed=0, judge_agreement=0.7)
    assert result["trained"]["reward_mean"] - result["base"]["reward_mean"] == pytest.approx(0.2)
    assert result["vs_base"]["mean"] == pytest.approx(0.2) and result["vs_base"]["level"] == 0.9
    assert result["per_domain"]["sales"]["trained"] == pytest.approx(0.5) and result["trained"]["empathy"] == 0.5
    # tool use: episodes with a call on scenarios with tools; calls that succeeded (none made: NaN)
    assert result["trained"]["tool_call_rate"] == 0.5 and result["trained"]["tool_success"] == 0.25
    assert result["trained"]["tool_malformed"] == 0.25 and "calls_malformed" not in result["trained"]
    assert result["base"]["tool_call_rate"] == 0.0 and np.isnan(result["base"]["tool_success"])
    assert result["per_domain_tools"]["sales"]["trained"] == {"tool_call_rate": 0.5, "tool_success": 0.5}
    assert result["per_domain_vs"]["tutoring"]["vs_base"]["mean"] == pytest.approx(0.2)
    with_sft = compare({**tables(0.2), "sft": tables(0.1)["trained"]}, judge, 0.01, config, seed=0)
    assert with_sft["vs_sft"]["mean"] == pytest.approx(0.1) and set(with_sft["per_domain_vs"]["sales"]) == {
        "vs_base",
        "vs_sft",
    }
    assert result["flagged"] and "judge win rate is 0.00" in result["flags"][0]  # the judge prefers the base
    assert result["judge_trusted"]
    at_chance = compare(tables(0.2), judge, 0.01, config, seed=0, judge_agreement=0.5)  # or never measured
    assert not at_chance["judge_trusted"] and not at_chance["flagged"] and at_chance["judge"] == judge
    assert not compare(tables(0.2), judge, 0.01, config, seed=0)["judge_trusted"]
    assert not compare(tables(0.2), {"vs_base": win_rate([])}, 0.0, config, seed=0)["flagged"]
    longer = tables(0.2)
    longer["trained"]["reply_words"] = 20.0
    assert "factor of 2.00" in compare(longer, {"vs_base": win_rate([])}, 0.0, config, seed=0)["flags"][0]


def test_report_and_pairs_to_judge():
    from grpo.evaluation import ci_line, compare, pairs_to_judge, report_markdown
    from grpo.scenarios import Scenario

    config = evaluate_config(ci_level=0.95)
    t = tables(0.2)
    result = compare(t, {"vs_base": win_rate([])}, 0.0123, config, seed=0)
    line = ci_line(result, "base")
    assert line.startswith("trained - base: +0.200, 95% CI [+") and line.endswith("judge 0W/0L/0T, 0 unjudged")
    report = report_markdown(result, t, n_examples=1)
    assert "| reward_mean | 0.350 | 0.550 |" in report and f"- {line}" in report and "0.0123" in report
    assert "### s0" in report and "> *user*: q0" in report and "### s1" not in report

    scenarios = [
        Scenario(id=f"s{i}", domain=d, persona="p", goal="g", opening="Hi")
        for i, d in enumerate(["sales", "tutoring"] * 4)
    ]
    groups, flips = pairs_to_judge(scenarios, t["trained"], t["base"], 4, seed=0)
    assert len(groups) == len(flips) == 4 and (groups, flips) == pairs_to_judge(
        scenarios, t["trained"], t["base"], 4, 0
    )
    assert {domain for domain, _ in groups} == {"sales", "tutoring"}
    for (_, pair), flip in zip(groups, flips):
        assert pair[flip] is not pair[1 - flip] and all(len(c) == 2 for c in pair)


def test_an_extra_set_leaves_out_the_rows_training_used(tmp_path):
    """evaluate.extra_sets: imported as prepare imports, PII masked; a row whose opening (masked or
    not) or id is in the train set is never evaluated, and is counted."""
    import pandas as pd

    from grpo.config import ExtraSet
    from grpo.scenarios import Scenario, to_frame
    from tasks.evaluate import extra_scenarios

    rows = pd.DataFrame(
        {
            "instruction": ["where is my parcel", "mail me at a@b.com", "cancel order 12", "I want a refund"],
            "response": ["r1", "r2", "r3", "r4"],
        }
    )
    rows.to_csv(tmp_path / "set.csv", index=False)
    spec = ExtraSet(
        source={
            "path": str(tmp_path / "set.csv"),
            "format": "csv",
            "domain": "customer_service",
            "columns": {"opening": "instruction", "example_response": "response"},
        },
        max_scenarios=None,
    )
    trained_on = [
        Scenario(id="x", domain="sales", persona="p", goal="g", opening="where is my parcel"),  # the raw text
        Scenario(id="y", domain="sales", persona="p", goal="g", opening="mail me at [EMAIL]"),  # as prepare masked it
        Scenario(id="set-00003", domain="sales", persona="p", goal="g", opening="something else"),  # the same row id
    ]
    to_frame(trained_on).to_parquet(tmp_path / "train.parquet")
    chosen, excluded = extra_scenarios("s", spec, str(tmp_path / "train.parquet"), seed=0)
    assert [s.opening for s in chosen] == ["I want a refund"] and excluded == 3
    assert chosen[0].example_responses == ["r4"]
    to_frame(
        [*trained_on, Scenario(id="z", domain="sales", persona="p", goal="g", opening="I want a refund")]
    ).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="evaluate.extra_sets.s: every row of .*set.csv is in the train set"):
        extra_scenarios("s", spec, str(tmp_path / "train.parquet"), seed=0)
