"""Supervised warm start before GRPO: demonstrations built from the training scenarios, and TRL's
SFTTrainer with LoRA on them. SFT teaches the format (above all, how to call a tool and use its
result); GRPO then improves behaviour from there.

A demonstration is an episode in the very form the rollout holds (grpo/rollout.py): the same
system prompt and tool declaration, the same chat-template rendering, the token ids and an
assistant mask that is 1 on the agent's tokens only, so the loss falls on what the agent says and
SFT trains on exactly what GRPO samples from. For each scenario:

* with tools, when the opening gives a call's arguments (an order or account id it names, words to
  search the knowledge base with: its first six of over three letters, a summary for a ticket):
  the agent calls the tool in the documented format (grpo/tools.py), the tool's real result comes
  back from the scenario's backend, and the agent answers with what it returned;
* otherwise, with an example response: the agent gives it (and the second one after the first
  follow-up, where the scenario has both);
* otherwise, when a tool needs an order or account number the opening does not give: the agent
  asks for it (:func:`ask_for`), rather than calling with a number it made up.

Scenarios that give none of these are left out, and counted.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile

import torch

from grpo.config import SFTConfig
from grpo.models import lora_config, use_bf16
from grpo.rollout import ConversationEnvironment, Trajectory, encode
from grpo.scenarios import Scenario
from grpo.tools import TOOLS, call_text, call_tool, given_ids

# The order in which a scenario's tools are tried for its demonstration: look before acting.
PREFERENCE = ("check_order_status", "lookup_account", "search_knowledge_base", "create_ticket", "process_refund")
# A ticket's summary in a demonstration: with 8 words the longest call turn, end of turn included, is
# 48 tokens (the first sentence whole made 11 of 58 calls longer than that).
SUMMARY_WORDS = 8
# What the agent asks for when a tool's key (grpo/tools.py Tool.key) names a record of this table.
ASK = {"orders": "order number", "accounts": "account number"}


def call_for(scenario: Scenario) -> tuple[str, dict] | None:
    """The demonstration's call: the first of the scenario's tools (in :data:`PREFERENCE` order)
    whose arguments its opening gives; ``None`` if none does."""
    text = scenario.opening
    for name in sorted(scenario.tools, key=lambda t: PREFERENCE.index(t) if t in PREFERENCE else len(PREFERENCE)):
        tool = TOOLS.get(name)
        if tool is not None and tool.key:  # an id the user gave, as strict calls take it (grounded_schemas)
            named = [k for k in given_ids(text) if k in scenario.backend.get(tool.table, {})]
            if named:
                return name, {tool.key: named[0]}
        elif name == "search_knowledge_base":
            words = [w for w in re.findall(r"[a-z0-9']+", text.lower()) if len(w) > 3]  # content words, roughly
            if words:
                return name, {"query": " ".join(words[:6])}
        elif name == "create_ticket":
            first = re.split(r"(?<=[.!?])\s", text.strip())[0].split()  # its first sentence, short enough
            return name, {"summary": " ".join(first[:SUMMARY_WORDS]), "priority": "normal"}  # to fit a turn
    return None


def ask_for(scenario: Scenario) -> str | None:
    """The agent's reply that asks for the number its scenario's tools need (the first such tool in
    :data:`PREFERENCE` order); ``None`` if none of its tools needs one. Only for scenarios without a
    call (:func:`call_for`): a call with a made-up number fails, and the user can give the real one."""
    needed = next((ASK[TOOLS[t].table] for t in PREFERENCE if t in scenario.tools and TOOLS[t].key), None)
    return (
        None if needed is None else f"I'm sorry for the trouble. Could you give me your {needed} so I can look into it?"
    )


def answer_for(name: str, result: dict) -> str:
    """The agent's reply that uses a tool's result."""
    if "error" in result:
        return f"I'm sorry, I could not do that: {result['error']}. Could you check the details for me?"
    if name == "check_order_status":
        items = ", ".join(map(str, result.get("items", []))) or "your items"
        return (
            f"Thanks for your patience. I checked order {result['order_id']}: it is {result.get('status')} "
            f"({items}). Is there anything else I can do for you?"
        )
    if name == "process_refund":
        return f"I have refunded {result.get('refunded')} for order {result['order_id']}: {result.get('status')}."
    if name == "lookup_account":
        facts = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in result.items() if k != "account_id")
        return f"I looked up your account {result['account_id']}. {facts}. How can I help with it?"
    if name == "search_knowledge_base":
        if not result.get("results"):
            return "I could not find a help article on that. Could you tell me a little more?"
        top = result["results"][0]
        return f'Our guide "{top["title"]}" says: {top["text"]} Let me know if that does not solve it.'
    if name == "create_ticket":
        return (
            f"I'm sorry for the trouble. I have opened ticket {result.get('ticket_id')} so a specialist "
            "can follow up with you. Is there anything else I can help with?"
        )
    return f"Here is what I found: {json.dumps(result)}"


def say(env: ConversationEnvironment, t: Trajectory, text: str) -> None:
    """Append an agent turn, as the rollout appends a sampled one: its tokens and end of turn, masked 1."""
    ids = encode(env.tok, text) + [env.tok.eos_token_id]
    t.input_ids += ids
    t.assistant_mask += [1] * len(ids)
    t.messages.append({"role": "assistant", "content": text})
    t.turns += 1


def demonstration(env: ConversationEnvironment, scenario: Scenario) -> Trajectory | None:
    """The scenario's demonstration (see the module docstring), ``None`` if it gives none."""
    given = call_for(scenario)
    call = given if env.config.max_turns > 1 else None  # one turn: no room to use a result
    ask = ask_for(scenario) if given is None else None
    if call is None and not scenario.example_responses and ask is None:
        return None
    t = env.start(scenario, 0)
    if call is not None:
        say(env, t, call_text(*call))
        result, _ = call_tool(*call, scenario.tools, copy.deepcopy(scenario.backend))
        env.add_context(t, "tool", result)
        t.tool_calls += 1
        say(env, t, answer_for(call[0], json.loads(result)))
    elif scenario.example_responses:
        say(env, t, scenario.example_responses[0])
        if len(scenario.example_responses) > 1 and scenario.followups and env.config.max_turns > 1:
            env.add_context(t, "user", scenario.followups[0])
            say(env, t, scenario.example_responses[1])
    else:
        say(env, t, ask)
    return t


def demonstrations(env: ConversationEnvironment, scenarios: list[Scenario]) -> list[Trajectory]:
    """One demonstration per scenario that gives one, in the scenarios' order."""
    demos = [d for d in (demonstration(env, s) for s in scenarios) if d is not None]
    for d in demos:
        d.check()
    return demos


def train_sft(model, tokenizer, demos: list[Trajectory], config: SFTConfig, seed: int, device: str):
    """LoRA SFT with TRL's SFTTrainer on the demonstrations' token ids, the loss on the agent's
    tokens only (their ``assistant_masks``). Returns ``(merged model, per-step log)``."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    dataset = Dataset.from_list([{"input_ids": d.input_ids, "assistant_masks": d.assistant_mask} for d in demos])
    with tempfile.TemporaryDirectory(prefix="sft-") as out:
        args = TRLSFTConfig(
            output_dir=out,
            use_cpu=device == "cpu",
            # accelerate's autocast (as train_policy's update), or bf16 weights already (policy_dtype on a GPU)
            bf16=model.dtype == torch.bfloat16 or use_bf16(config.bf16, torch.device(device)),
            num_train_epochs=config.epochs,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.batch_size,
            max_length=config.max_length,
            seed=seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
        )
        lora = lora_config(config.lora_r, config.lora_alpha)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
    history = [
        {"step": r["step"], "loss": r["loss"], "mean_token_accuracy": r.get("mean_token_accuracy")}
        for r in trainer.state.log_history
        if "loss" in r
    ]
    return trainer.model.merge_and_unload(), history
