import json

import numpy as np

from grpo import rewards
from grpo.scenarios import Scenario
from grpo.tools import TOOLS, call_tool, instructions, parse_call, unresolved

BACKEND = {
    "orders": {"7": {"status": "shipped", "items": ["kettle"], "total": 30.0, "refundable": False}},
    "knowledge_base": [
        {"title": "Printer offline", "text": "Restart the spooler."},
        {"title": "VPN", "text": "Check UDP ports."},
    ],
}


def test_parse_call_finds_the_call_or_says_what_is_malformed():
    assert parse_call("Sure.") is None
    assert parse_call(
        'Let me look. <tool_call>{"name": "check_order_status", "arguments": {"order_id": "7"}}</tool_call>'
    ) == ("check_order_status", {"order_id": "7"})
    assert parse_call('<tool_call>{"name": "x"')[0] == ""  # cut off: malformed, not ignored
    assert parse_call('<tool_call>{"name": "x", "arguments": {}}</tool_') == ("x", {})  # cut in the closing tag
    # Llama 3.1's format: the whole reply is the call
    assert parse_call(' {"name": "lookup_account", "parameters": {"account_id": "a1"}}') == (
        "lookup_account",
        {"account_id": "a1"},
    )
    assert parse_call('{"price": 10}') is None and parse_call("{not json") is None
    assert 'needs a "name"' in parse_call('<tool_call>{"arguments": {}}</tool_call>')[1]


def test_calls_read_and_write_the_backend_and_errors_never_raise():
    backend = json.loads(json.dumps(BACKEND))
    out, ok = call_tool("check_order_status", '{"order_id": "#7"}', ["check_order_status"], backend)
    assert ok and json.loads(out)["status"] == "shipped"
    for name, args, allowed, problem in [
        ("process_refund", {"order_id": "7"}, ["process_refund"], "not eligible"),
        ("check_order_status", {"order_id": "8"}, ["check_order_status"], "no order '8'"),
        ("process_refund", {"order_id": "7"}, ["check_order_status"], "unknown tool"),
        ("check_order_status", "{oops", ["check_order_status"], "not valid JSON"),
        ("", "the tool call is not valid JSON", ["check_order_status"], "not valid JSON"),
    ]:
        out, ok = call_tool(name, args, allowed, backend)
        assert not ok and problem in json.loads(out)["error"], (name, out)
    out, ok = call_tool("create_ticket", {"summary": "broken"}, ["create_ticket"], backend)
    assert ok and backend["tickets"] == [{"summary": "broken", "priority": "normal"}]
    out, ok = call_tool("search_knowledge_base", {"query": "printer offline"}, ["search_knowledge_base"], backend)
    assert json.loads(out)["results"][0]["title"] == "Printer offline"


def test_unresolved_and_instructions():
    assert unresolved(["teleport", "lookup_account", "create_ticket"], BACKEND) == (["teleport"], ["lookup_account"])
    text = instructions(["check_order_status"])
    assert '"name": "check_order_status"' in text and "<tool_call>" in text and set(TOOLS) >= {"process_refund"}


def test_tool_use_reward_and_agent_turns_without_call_markup():
    scen = Scenario(id="s", domain="customer_service", persona="p", goal="g", opening="o", tools=["check_order_status"])
    plain = scen.model_copy(update={"tools": []})
    call = {"role": "assistant", "content": '<tool_call>{"name": "check_order_status"}</tool_call>'}
    good = [
        {"role": "user", "content": "o"},
        call,
        {"role": "tool", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "It shipped."},
    ]
    bad = good[:2] + [{"role": "tool", "content": '{"error": "no order"}'}] + good[3:]
    none = [{"role": "user", "content": "o"}, {"role": "assistant", "content": "It shipped."}]
    # a failed call scores below no call: guessing an order number is worse than asking for it
    assert rewards.ToolUse()([good, bad, none, good[:3] + bad[1:]], scen).tolist() == [1.0, -1.0, 0.0, 0.0]
    bare = [{"role": "assistant", "content": '{"name": "check_order_status", "arguments": {}}'}] + good[2:]
    assert (
        rewards.agent_turns(good) == rewards.agent_turns(bare) == ["It shipped."]
    )  # calls are not replies to the user
    assert rewards.ToolUse()([good, none], plain).tolist() == [0.0, 1.0]
    assert rewards.agent_turns(good) == ["It shipped."]
    assert np.allclose(rewards.LengthBand(1, 5)([good], scen), rewards.LengthBand(1, 5)([none], scen))


def test_chat_runs_the_agents_calls_against_the_scenarios_backend():
    """`grpo-agents chat --scenario`: a reply that calls a tool is run on the chat's copy of the
    backend and answered with a tool message, and the agent speaks again, as in training."""
    from grpo_agents.cli import MAX_TOOL_ROUNDS, agent_turn

    scenario = Scenario(
        id="s", domain="customer_service", persona="p", goal="g", opening="Where is 7?", tools=["check_order_status"]
    )
    call = '<tool_call>{"name": "check_order_status", "arguments": {"order_id": "7"}}</tool_call>'
    replies, said = iter([call, "It shipped."]), []
    messages = scenario.first_messages()
    agent_turn(lambda m: next(replies), messages, scenario, BACKEND, said.append)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(messages[3]["content"])["status"] == "shipped"
    assert said == [f"agent> {call}", f"tool> {messages[3]['content']}", "agent> It shipped."]
    # an agent that only ever calls tools gets the user back after MAX_TOOL_ROUNDS calls
    messages = scenario.first_messages()
    agent_turn(lambda m: call, messages, scenario, BACKEND, said.append)
    assert [m["role"] for m in messages].count("tool") == MAX_TOOL_ROUNDS
    assert messages[-1]["role"] == "assistant"
    # without a scenario, a call is just text
    messages = [{"role": "user", "content": "hi"}]
    agent_turn(lambda m: call, messages, None, None, said.append)
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_a_strict_call_always_parses_to_a_declared_tool(tokenizer):
    """Random walks through what grpo/structured.py call_constraint allows (ASCII tokens, so that
    any text is possible) from a reply's first '<': every one ends in a call of a declared tool whose
    arguments are the tool's, string arguments at most MAX_ARGUMENT_CHARS long (lm-format-enforcer
    lets one more character through now and then)."""
    import random

    from grpo.structured import MAX_ARGUMENT_CHARS, call_constraint
    from grpo.tools import schemas

    declared = ["check_order_status", "create_ticket"]
    constraint = call_constraint(tokenizer, schemas(declared))
    ascii_tokens = {i for i in range(len(tokenizer)) if tokenizer.decode([i]).isascii()} | {tokenizer.eos_token_id}
    rng = random.Random(0)
    for _ in range(12):
        tokens = tokenizer.encode("<", add_special_tokens=False)
        while tokens[-1] != tokenizer.eos_token_id:
            allowed = constraint(tokens)
            assert allowed is not None, tokenizer.decode(tokens)
            tokens.append(rng.choice(sorted(set(allowed) & ascii_tokens)))
            assert len(tokens) < 200
        text = tokenizer.decode(tokens[:-1])
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
        name, arguments = parse_call(text)
        assert name in declared and set(arguments) <= set(TOOLS[name].parameters["properties"]), text
        assert set(arguments) >= set(TOOLS[name].parameters["required"]), text
        assert all(len(v) <= MAX_ARGUMENT_CHARS + 1 for v in arguments.values()), text  # lm-format-enforcer: +1
        result, ok = call_tool(name, arguments, declared, json.loads(json.dumps(BACKEND)))
        assert ok or "no order" in result, result  # only the backend can refuse it (an unknown order id)
    # A call is a whole reply: after some text, no allowed token completes a <tool_call>
    for head in ("Sure, <tool_call", "Sure, <tool", "Sure, <"):
        tokens = tokenizer.encode(head, add_special_tokens=False)
        for t in constraint(tokens) or range(len(tokenizer)):  # None: no token completes it, any may follow
            assert "<tool_call>" not in tokenizer.decode([*tokens, t]), (head, tokenizer.decode([t]))
    assert tokenizer.encode(">", add_special_tokens=False)[0] not in constraint(
        tokenizer.encode("Sure, <tool_call", add_special_tokens=False)
    )
    # Whether to call is the model's: free before the first token, for other replies, and after eos.
    assert constraint([]) is None
    assert constraint(tokenizer.encode("Sure, <tool", add_special_tokens=False)) is None
    call = tokenizer.encode('<tool_call>{"name": "create_ticket"', add_special_tokens=False)
    assert constraint(call) is not None and constraint(call + [tokenizer.eos_token_id]) is None


def test_strict_calls_take_ids_only_from_the_user(tokenizer):
    """grpo/tools.py grounded_schemas: a tool's key argument may only be an id the user gave, and a
    tool that needs one is left out while the user has given none; with no tool left, no reply may
    begin like a call (grpo/structured.py no_call), though any other reply may."""
    import random

    from grpo.structured import call_constraint
    from grpo.tools import given_ids, grounded_schemas

    said = "Order #48213 and account L-20931; I had 4,200 points and paid 59.90 in 2024."
    assert given_ids(said) == ("48213", "L-20931", "2024")
    declared = ["check_order_status", "lookup_account", "create_ticket"]
    grounded = {f["function"]["name"]: f["function"]["parameters"] for f in grounded_schemas(declared, ("48213",))}
    assert grounded["check_order_status"]["properties"]["order_id"]["enum"] == ["48213"]
    assert grounded["create_ticket"] == TOOLS["create_ticket"].parameters
    assert [f["function"]["name"] for f in grounded_schemas(declared, ())] == ["create_ticket"]
    assert grounded_schemas(["check_order_status", "process_refund"], ()) == []

    rng = random.Random(0)
    constraint = call_constraint(tokenizer, grounded_schemas(["check_order_status"], ("48213",)))
    for _ in range(4):
        tokens = tokenizer.encode("<", add_special_tokens=False)
        while tokens[-1] != tokenizer.eos_token_id:
            tokens.append(rng.choice(constraint(tokens)))
        assert parse_call(tokenizer.decode(tokens[:-1])) == ("check_order_status", {"order_id": "48213"})

    barred = call_constraint(tokenizer, [])
    first = set(barred([]))
    for text in ("<", "<tool", "<tool_call>"):
        assert tokenizer.encode(text, add_special_tokens=False)[0] not in first, text
    assert {tokenizer.eos_token_id, *tokenizer.encode("Sure", add_special_tokens=False)} <= first
    assert barred(tokenizer.encode("Sure, here", add_special_tokens=False)) is None
    # after some text, a <tool_call> may begin but no allowed token completes it
    assert tokenizer.encode(">", add_special_tokens=False)[0] not in barred(
        tokenizer.encode("Sure, <tool_call", add_special_tokens=False)
    )
    for head in ("Sure, <tool_call", "Sure, <tool_", "Sure, <tool", "Sure, <"):
        tokens = tokenizer.encode(head, add_special_tokens=False)
        for t in barred(tokens) or range(len(tokenizer)):  # None: no token completes it, any may follow
            assert "<tool_call>" not in tokenizer.decode([*tokens, t]), (head, tokenizer.decode([t]))
