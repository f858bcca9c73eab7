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
    assert win_rate(verdicts) == {"wins": 2, "losses": 1, "ties": 1, "unjudged": 1, "win_rate": 2.5 / 4}
    assert win_rate(verdicts, first=1)["wins"] == 1
    per_pair = win_rate(verdicts, first=[0, 1, 0, 0, 1])  # the order each pair was shown in
    assert (per_pair["wins"], per_pair["losses"], per_pair["ties"]) == (2, 1, 1)
    assert np.isnan(win_rate([v(None)])["win_rate"])


def test_hacking_flags():
    losing = {"wins": 1, "losses": 3, "ties": 0, "win_rate": 0.25}
    assert hacking_flags(0.3, {"wins": 3, "losses": 1, "ties": 0, "win_rate": 0.75}, 1.5, 1.1) == []
    assert "judge win rate is 0.25" in hacking_flags(0.3, losing, 1.5, 1.0, min_judged=4)[0]
    assert hacking_flags(0.3, losing, 1.5, 1.0, min_judged=5) == []  # four verdicts are not enough evidence
    assert hacking_flags(-0.3, losing, 1.5) == []  # reward fell too: nothing hidden
    assert hacking_flags(0.3, {"win_rate": float("nan")}, 1.5) == []  # no judge verdicts: not assessable
    assert "factor of 2.00" in hacking_flags(0.3, {}, 1.5, 2.0)[0] and hacking_flags(0.3, {}, 1.5, 0.5)


def test_policy_kl_is_zero_against_itself_and_positive_against_another(tiny_model, tokenizer):
    import torch

    from grpo.models import tiny_causal_lm
    from grpo.rollout import ConversationEnvironment
    from grpo.scenarios import Scenario

    env = ConversationEnvironment(tokenizer, max_turns=1, max_new_tokens=6)
    scen = [Scenario(id="a", domain="sales", persona="p", goal="g", opening="Which plan?")]
    torch.manual_seed(0)
    trajs = env.rollout(tiny_model, scen, 4)
    assert policy_kl(tiny_model, tiny_model, trajs, tokenizer.pad_token_id) == pytest.approx(0.0, abs=1e-5)
    other = tiny_causal_lm(tokenizer, seed=1)
    assert policy_kl(tiny_model, other, trajs, tokenizer.pad_token_id) > 0.01
