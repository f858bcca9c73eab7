"""The supervised warm start: demonstrations in the rollout's exact form, from training scenarios
only, and an SFT that teaches the call format."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from grpo.config import RolloutConfig, SFTConfig
from grpo.models import tiny_causal_lm
from grpo.rollout import ConversationEnvironment, encode, render
from grpo.scenarios import Scenario, to_frame
from grpo.sft import call_for, demonstration, demonstrations, train_sft
from grpo.tools import parse_call

ORDER = Scenario(
    id="late",
    domain="customer_service",
    persona="p",
    goal="g",
    opening="Where is my order 48213? It is late.",
    tools=["process_refund", "check_order_status"],
    backend={"orders": {"48213": {"status": "lost in transit", "items": ["lamp"], "total": 20.0, "refundable": True}}},
)
PLAIN = Scenario(
    id="plain",
    domain="tutoring",
    persona="p",
    goal="g",
    opening="What is a prime?",
    followups=["And 9?"],
    example_responses=["A number with exactly two divisors.", "9 is not prime: 3 divides it."],
)
MISSING = Scenario(  # its only tool needs an order id the opening does not give, and no example
    id="missing",
    domain="customer_service",
    persona="p",
    goal="g",
    opening="My order is late.",
    tools=["check_order_status"],
    backend={"orders": {"1": {"status": "shipped"}}},
)
NOTHING = Scenario(id="nothing", domain="sales", persona="p", goal="g", opening="Hi.")  # no tools, no example


def test_a_tool_demonstration_calls_with_the_conversations_id_and_uses_the_real_result(tokenizer):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2))
    assert call_for(ORDER) == ("check_order_status", {"order_id": "48213"})  # look before the refund
    t = demonstration(env, ORDER)
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert parse_call(t.messages[2]["content"]) == ("check_order_status", {"order_id": "48213"})
    assert json.loads(t.messages[3]["content"])["status"] == "lost in transit"
    assert "lost in transit" in t.messages[4]["content"] and ORDER.backend["orders"]["48213"].get("refunded") is None
    # the rollout's very form: ids are the template's rendering, the mask is on the agent's tokens only
    assert t.input_ids + encode(tokenizer, "\n") == encode(tokenizer, render(tokenizer, t.messages, False))
    masked = [i for i, m in zip(t.input_ids, t.assistant_mask) if m]
    assert tokenizer.decode(masked, skip_special_tokens=True) == t.messages[2]["content"] + t.messages[4]["content"]
    assert "You can use these tools" in t.messages[0]["content"]


def test_example_responses_make_the_other_demonstrations_and_the_rest_are_left_out(tokenizer):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2))
    demos = demonstrations(env, [ORDER, NOTHING, MISSING, PLAIN])
    assert [d.scenario_id for d in demos] == ["late", "missing", "plain"]
    # a tool needs a number the opening does not give: ask for it, no call with a made-up one
    assert [m["role"] for m in demos[1].messages] == ["system", "user", "assistant"]
    assert "order number" in demos[1].messages[2]["content"] and demos[1].tool_calls == 0
    assert parse_call(demos[1].messages[2]["content"]) is None
    demos = demos[::2]  # late and plain
    assert [m["content"] for m in demos[1].messages if m["role"] != "system"] == [
        "What is a prime?",
        "A number with exactly two divisors.",
        "And 9?",
        "9 is not prime: 3 divides it.",
    ]
    # with one agent turn an episode has no room to use a tool's result: no tool demonstration
    one_turn = demonstrations(ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1)), [ORDER, PLAIN])
    assert [d.scenario_id for d in one_turn] == ["plain"]
    assert [m["role"] for m in one_turn[0].messages] == ["system", "user", "assistant"]


def test_the_stage_builds_demonstrations_from_the_train_set_only(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """The eval scenarios would give demonstrations too (tools and ids, examples): none is used."""
    import tasks.sft
    from grpo_agents.params import load_params

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    to_frame([ORDER, NOTHING]).to_parquet(prepared / "train.parquet")
    held_out = [s.model_copy(update={"id": f"eval-{s.id}", "family": f"eval-{s.id}"}) for s in (ORDER, PLAIN)]
    to_frame(held_out).to_parquet(prepared / "eval.parquet")
    seen = {}

    def fake_train(model, tokenizer, demos, config, seed, device):
        seen["ids"] = [d.scenario_id for d in demos]
        return model, [{"step": 1, "loss": 1.0}]

    monkeypatch.setattr(tasks.sft, "train_sft", fake_train)
    monkeypatch.setattr(tasks.sft, "log_metrics", lambda *a, **k: None)
    caplog.set_level("WARNING", logger="tasks.sft")
    params = load_params()
    paths = params.paths.model_copy(
        update={
            "base_model": str(tiny_model_dir),
            "prepared": str(prepared),
            "sft_model": str(tmp_path / "sft"),
            "metrics": str(tmp_path / "metrics"),
            "plots": str(tmp_path / "plots"),
        }
    )
    on = params.sft.model_copy(update={"enabled": True})
    short = params.rollout.model_copy(update={"max_new_tokens": 32})  # the default before sft was on
    summary = tasks.sft.run(on, short, 7, "cpu", paths)
    assert (
        seen["ids"] == ["late"] and summary["demonstrations"] == 1 and summary["scenarios_without_demonstration"] == 1
    )
    assert (tmp_path / "sft/model.safetensors").exists()
    assert json.loads((tmp_path / "metrics/sft.json").read_text())["tool_demonstrations"] == 1
    assert len(pd.read_csv(tmp_path / "plots/sft.csv")) == 1
    # the call alone is 36 tokens: rollouts of 32 would cut it, and the stage says so
    assert "1 of 1 demonstrations have an agent turn longer than rollout.max_new_tokens 32" in caplog.text
    assert "1 of them a tool call" in caplog.text
    # disabled: a note, and train_policy starts from the base model
    off = params.sft.model_copy(update={"enabled": False})
    assert tasks.sft.run(off, params.rollout, 7, "cpu", paths) == {"enabled": 0}
    assert not (tmp_path / "sft/model.safetensors").exists() and (tmp_path / "sft/SKIPPED.json").exists()
    assert pd.read_csv(tmp_path / "plots/sft.csv").empty  # every output dvc.yaml declares is there
    assert paths.policy_start(off) == str(tiny_model_dir) and paths.policy_start(on) == str(tmp_path / "sft")


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_teaches_the_call_format(tokenizer, bf16):
    """TRL's SFTTrainer on one tool demonstration, with the loss on the agent's tokens: afterwards
    the tiny random model, greedy, opens the episode with the call (it never does before), with
    and without bf16 autocast, and its forwards run under autocast exactly when ``sft.bf16`` asks.
    (Its weights are drawn wider than the default 0.02, or its logits are too flat for LoRA to move.)"""
    tiny_model = tiny_causal_lm(tokenizer, initializer_range=0.5)
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=40))
    [demo] = demonstrations(env, [ORDER])
    prompt = env.start(ORDER, 0).input_ids

    def first_reply(model):
        return env.decode(env.generate(model, [prompt], do_sample=False)[0])

    assert parse_call(first_reply(tiny_model)) is None
    autocast = []
    tiny_model.register_forward_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    config = SFTConfig(epochs=50, learning_rate=0.05, batch_size=1, lora_r=8, lora_alpha=16, bf16=bf16)
    merged, history = train_sft(tiny_model, tokenizer, [demo], config, seed=0, device="cpu")
    assert set(autocast) == {bf16}
    assert history[-1]["loss"] < history[0]["loss"] / 4
    assert parse_call(first_reply(merged)) == ("check_order_status", {"order_id": "48213"})


@pytest.mark.parametrize("field", ["epochs", "learning_rate"])
def test_bad_settings_are_refused(field):
    with pytest.raises(ValueError, match=field):
        SFTConfig(**{field: 0})
