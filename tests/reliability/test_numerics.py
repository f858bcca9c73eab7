"""Numerics: a NaN injected into the rewards, advantages, log-probs or loss stops the run at the
step it appears in, before an update uses it (both backends); a run that stops writes no policy, so
it never reaches evaluate. An evaluation with a NaN is refused by register: nothing is registered."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from conftest import ROOT

import grpo.trainer
from grpo.config import GRPOConfig, RolloutConfig
from grpo.rollout import ConversationEnvironment
from grpo.scenarios import Scenario
from grpo.trainer import train
from grpo_agents.params import load_params

SCEN = [Scenario(id=f"s{i}", domain="sales", persona="p", goal="g", opening=f"Question {i}?") for i in range(2)]


def length_reward(convs, scen):
    raw = np.array([len(c[-1]["content"]) for c in convs], dtype=float)
    return raw, {"length": raw}


def poisoned(fn, armed: dict):
    """``fn`` whose result is all NaN once ``armed["on"]`` is set (after the first step)."""

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not armed["on"]:
            return out
        if isinstance(out, tuple):  # group_advantages: (advantages, zero-std groups)
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    return wrapper


@pytest.mark.parametrize("where", ["rewards", "advantages", "log-probs", "loss"])
def test_a_nan_stops_the_native_run_at_the_step_it_appears_in(where, tokenizer, tiny_model, monkeypatch):
    armed, steps = {"on": False}, []

    def on_step(step, row):
        steps.append(step)
        armed["on"] = True  # from the second step on

    reward = length_reward
    if where == "rewards":

        def reward(convs, scen):
            total, raw = length_reward(convs, scen)
            return (total * np.nan if armed["on"] else total), raw

    target = {"advantages": "group_advantages", "log-probs": "token_logprobs", "loss": "aggregate"}.get(where)
    if target:
        monkeypatch.setattr(grpo.trainer, target, poisoned(getattr(grpo.trainer, target), armed))
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4))
    cfg = GRPOConfig(steps=3, scenarios_per_step=1, group_size=2, lora_r=2, beta=0.1, num_iterations=2)
    with pytest.raises(FloatingPointError, match=f"step 2: non-finite [a-z ]*{where}"):
        train(tiny_model, tokenizer, SCEN, reward, env, cfg, on_step=on_step)
    assert steps == [1]


def test_a_nan_loss_stops_the_trl_backend_at_its_step(tokenizer, tiny_model, monkeypatch):
    from trl import GRPOTrainer

    from grpo.trl_backend import train_trl

    armed, steps = {"on": False}, []

    def on_step(step, row):
        steps.append(step)
        armed["on"] = True

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", poisoned(GRPOTrainer._compute_loss, armed))
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4))
    cfg = GRPOConfig(steps=3, scenarios_per_step=1, group_size=2, lora_r=2, backend="trl")
    with pytest.raises(FloatingPointError, match="step 2: non-finite loss"):
        train_trl(tiny_model, tokenizer, SCEN, length_reward, env, cfg, "cpu", on_step)
    assert steps == [1]


def test_register_refuses_an_evaluation_with_a_nan(tmp_path, monkeypatch):
    from tasks import register

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(ROOT / "params.yaml")
    paths = params.paths.model_copy(update={"metrics": str(tmp_path / "metrics")})
    (tmp_path / "metrics").mkdir()
    side = {"mean": 0.1, "ci_low": float("nan"), "ci_high": 0.2}
    evaluation = {"trained": {"reward_mean": 0.3}, "base": {"reward_mean": 0.2}, "vs_base": side}
    (tmp_path / "metrics/eval.json").write_text(json.dumps(evaluation))  # json writes NaN as NaN
    with pytest.raises(FloatingPointError, match=r"eval.json: non-finite vs_base.ci_low; nothing was registered"):
        register.run(params.register, "cpu", paths)
    assert mlflow.MlflowClient().search_registered_models() == []
