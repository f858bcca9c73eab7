"""The OpenAI-compatible server on loopback, driven by the official openai SDK."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from grpo.config import Limits
from grpo.models import load_causal_lm, load_tokenizer
from grpo.rollout import encode, render
from grpo.serving import create_app, serve_in_thread
from grpo.tools import TOOLS, call_tool, training_form

KEY = "test-token"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    loads = []

    def load():
        loads.append(1)
        return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), f"tiny-{len(loads)}"

    app = create_app(
        load, Limits(max_tokens=64, max_prompt_tokens=200, batch_wait_s=0.3, max_concurrent=8), api_key=KEY
    )
    with serve_in_thread(app) as url:
        yield url, app


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


MSGS = [{"role": "user", "content": "My order is late."}]
ORDER_TOOL = TOOLS["check_order_status"].schema()
ANSWER = {  # greedy under this schema, the random tiny model writes text from the first token
    "type": "json_schema",
    "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}},
}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_openai_sdk_gets_a_reply(server):
    url, _ = server
    r = client(url).chat.completions.create(model="any", messages=MSGS, max_tokens=8)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 5


def test_openai_sdk_streaming(server):
    url, _ = server
    chunks = list(client(url).chat.completions.create(model="any", messages=MSGS, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert isinstance("".join(c.choices[0].delta.content or "" for c in chunks), str)


def test_a_stream_sends_each_token_while_the_model_is_still_generating(server):
    """Real streaming: the model's 7th forward call (for the 7th token) waits until the test lets it
    go; by then the first tokens' text has arrived and the request is not finished. Once released,
    the stream ends, and its text is the unstreamed reply's (greedy, so the same)."""
    url, app = server
    srv = app.state.server
    body = {"model": "m", "messages": MSGS, "max_tokens": 12, "temperature": 0, "response_format": ANSWER}
    headers = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers).json()
    expected = whole["choices"][0]["message"]["content"]
    gate, calls, forward = threading.Event(), [], srv.model.forward

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            assert gate.wait(60), "the test never released the model"
        return forward(*args, **kwargs)

    srv.model.forward = held
    try:
        before, prefills = metric(url, "completion_tokens_total"), metric(url, "prefill_calls_total")
        deltas = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r:
            events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
            for event in events:
                deltas.append(event["choices"][0]["delta"].get("content") or "")
                if len(deltas) == 6:  # the role, then 5 tokens, each with text here ('{', ' "', 'ans', ...)
                    assert metric(url, "completion_tokens_total") == before and len(calls) <= 7
                    assert "".join(deltas) == expected[: len("".join(deltas))] != ""
                    gate.set()
            finish = event["choices"][0]["finish_reason"]
    finally:
        gate.set()
        del srv.model.forward
    assert gate.is_set() and metric(url, "prefill_calls_total") == prefills + 1
    assert "".join(deltas) == expected and finish == whole["choices"][0]["finish_reason"]


def test_concurrent_requests_are_batched(server):
    url, _ = server
    prefills, steps, rows = (metric(url, m) for m in ("prefill_calls_total", *DECODE))
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(lambda _: client(url).chat.completions.create(model="m", messages=MSGS, max_tokens=4), range(6))
        )
    assert len(replies) == 6
    assert 1 <= metric(url, "prefill_calls_total") - prefills < 6
    # decoding steps ran for several requests at once: more rows than steps
    assert metric(url, DECODE[1]) - rows > metric(url, DECODE[0]) - steps > 0


DECODE = ("decode_batch_size_count", "decode_batch_size_sum")  # decoding steps, and the rows they advanced


def test_a_request_joins_the_running_batch_and_leaves_it_when_finished(server):
    """Continuous batching: a short request sent while a long one is generating is prefilled into
    the running batch between its decoding steps (the long one's 5th forward call is held until the
    short one is queued, and each later call takes 20 ms), and is answered while the long one still
    generates, with the reply it gets alone (seeded)."""
    url, app = server
    srv = app.state.server
    short = {"seed": 3, "temperature": 1.0, "max_tokens": 4}
    alone = client(url).chat.completions.create(model="m", messages=MSGS, **short).choices[0].message.content
    calls, forward = [], srv.model.forward

    def slowed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            deadline = time.monotonic() + 60
            while srv.in_flight < 2 and time.monotonic() < deadline:  # the short request is queued
                time.sleep(0.01)
        time.sleep(0.02)
        return forward(*args, **kwargs)

    srv.model.forward = slowed
    try:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(
                client(url).chat.completions.create,
                model="m",
                messages=[{"role": "user", "content": "Tell me everything about my order."}],
                max_tokens=60,
                seed=1,
                temperature=1.0,
            )
            while len(calls) < 5:
                time.sleep(0.01)
            reply = client(url).chat.completions.create(model="m", messages=MSGS, **short)
            running = not long.done()
            assert long.result().choices[0].finish_reason == "length"  # it ran its 60 tokens
    finally:
        del srv.model.forward
    assert running and reply.choices[0].message.content == alone


def test_a_stream_whose_client_goes_away_stops_decoding(server):
    """A client that closes its stream after the first tokens frees its row: the request leaves the
    batch long before its 60 tokens (each forward call takes 50 ms here), and then a one-token
    request takes one forward call (its prefill) instead of waiting beside a running row."""
    url, app = server
    srv = app.state.server
    calls, forward = [], srv.model.forward

    def slowed(*args, **kwargs):
        calls.append(1)
        time.sleep(0.05)
        return forward(*args, **kwargs)

    srv.model.forward = slowed
    body = {"model": "m", "messages": MSGS, "max_tokens": 60, "seed": 1, "stream": True}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            lines = r.iter_lines()
            while len(calls) < 3:
                next(lines)
        deadline = time.monotonic() + 60
        while srv.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        client(url).chat.completions.create(model="m", messages=MSGS, max_tokens=1)
        before = len(calls)
        client(url).chat.completions.create(model="m", messages=MSGS, max_tokens=1)
    finally:
        del srv.model.forward
    assert len(calls) - before == 1 and before < 30


def test_requests_with_other_settings_share_a_batch_and_a_seed_fixes_the_reply(server):
    """Each row samples with its own temperature, top_p and seed, so requests with other settings
    batch together, and a seeded reply is the same alone and in a batch of other requests."""
    url, _ = server

    def ask(kw: dict) -> str:
        return (
            client(url)
            .chat.completions.create(model="m", messages=MSGS, max_tokens=12, **kw)
            .choices[0]
            .message.content
        )

    alone = ask({"seed": 5})
    settings = [
        {"seed": 5},
        {"seed": 6},
        {"temperature": 0.3, "top_p": 0.5},
        {"temperature": 0},
        {"seed": 5, "top_p": 0.9},
    ]
    before = metric(url, "prefill_calls_total")
    with ThreadPoolExecutor(len(settings)) as pool:
        replies = list(pool.map(ask, settings))
    # 4 different settings: separate prefills if batches needed equal settings
    assert metric(url, "prefill_calls_total") - before <= 3
    assert replies[0] == alone and replies[1] != alone


@pytest.mark.parametrize(
    "body, status, text",
    [
        ({"messages": [{"role": "bogus", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": []}, 400, "messages"),
        ({"messages": MSGS, "max_tokens": 999}, 400, "exceeds"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "prompt is"),
        ({}, 400, "messages"),
        (
            {
                "messages": MSGS,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}},
                },
            },
            400,
            "response_format.json_schema.schema: unsupported keyword 'pattern'",
        ),
        ({"messages": MSGS, "response_format": {"type": "json_schema"}}, 400, "json_schema is required"),
        ({"messages": MSGS, "tools": [ORDER_TOOL], "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": [{"role": "tool"}]}, 400, "messages.0: Value error, content is required"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400, "only assistant messages"),
        (
            {
                "messages": [
                    *MSGS,
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1"}}]},
                ]
            },
            400,
            "messages.1.tool_calls.0.function.arguments: a JSON object is needed",
        ),
        (
            {
                "messages": MSGS,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": 1}}}],
            },
            400,
            "tools.0.function: Value error, parameters",
        ),
    ],
)
def test_malformed_requests_get_4xx_json(server, body, status, text):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status and text in r.json()["error"]["message"]


def test_structured_outputs_follow_the_schema(server):
    """response_format json_schema: the random tiny model's reply is JSON the schema accepts, in
    the reply and in the stream."""
    import jsonschema

    schema = {"type": "object", "properties": {"v": {"enum": ["yes", "no"]}}, "required": ["v"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema, "strict": True}}
    c = client(server[0])
    r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=16, response_format=fmt, temperature=1.0)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop"
    chunks = c.chat.completions.create(model="m", messages=MSGS, max_tokens=16, response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks)), schema)


# The random tiny model never calls a tool by itself: a response_format holds its reply to a call of
# check_order_status (in Llama 3.1's bare-JSON form, which the server parses as Hermes' <tool_call>).
FORCED_CALL = {
    "type": "json_schema",
    "json_schema": {
        "name": "call",
        "schema": {
            "type": "object",
            "properties": {
                "name": {"const": "check_order_status"},
                "arguments": {
                    "type": "object",
                    "properties": {"order_id": {"const": "48213"}},
                    "required": ["order_id"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    },
}
BACKEND = {"orders": {"48213": {"status": "lost in transit", "items": ["lamp"], "total": 20.0, "refundable": True}}}


def test_a_tool_round_trip_through_the_openai_sdk(server, tokenizer):
    """The SDK declares a tool; the reply calls it and comes back as ``tool_calls`` (in the reply
    and in the stream); the client runs the call against a scenario backend and sends the result
    back as a ``tool`` message, which the server renders as the policy saw it in training."""
    url, _ = server
    c = client(url)
    returned = metric(url, "tool_calls_total")
    first = dict(model="m", messages=MSGS, tools=[ORDER_TOOL], response_format=FORCED_CALL, max_tokens=64)
    r = c.chat.completions.create(**first, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "check_order_status"
    assert json.loads(call.function.arguments) == {"order_id": "48213"}
    assert metric(url, "tool_calls_total") == returned + 1

    chunks = list(c.chat.completions.create(**first, stream=True))
    streamed = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in streamed] == [
        ("check_order_status", {"order_id": "48213"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    result, ok = call_tool(call.function.name, call.function.arguments, ["check_order_status"], BACKEND)
    assert ok and json.loads(result)["status"] == "lost in transit"
    conversation = [
        *MSGS,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    r2 = c.chat.completions.create(model="m", messages=conversation, tools=[ORDER_TOOL], max_tokens=8)
    assert isinstance(r2.choices[0].message.content, str) and r2.choices[0].finish_reason in ("stop", "length")
    messages, tools = training_form(conversation, [ORDER_TOOL], template_tools=False)
    text = render(tokenizer, messages, True, tools)
    assert r2.usage.prompt_tokens == len(encode(tokenizer, text))
    assert '<|im_start|>assistant\n<tool_call>{"name": "check_order_status"' in text and result in text

    plain = c.chat.completions.create(model="m", messages=MSGS, max_tokens=1).usage.prompt_tokens
    none = c.chat.completions.create(**first, tool_choice="none")  # not declared, so not parsed either
    assert none.usage.prompt_tokens == plain and none.choices[0].message.tool_calls is None
    assert "check_order_status" in none.choices[0].message.content


def test_strict_functions_get_calls_that_parse(server):
    """With ``strict: true`` a reply that begins like a call is held to a call of a declared function
    (grpo/structured.py call_constraint), as rollouts decode calls in training. The tiny random
    model is pushed to open its reply with '<' (a bias on its first token's logits only): strict, it
    comes back as ``tool_calls``; without strict, the same opening runs on as text."""
    url, app = server
    lt = app.state.server.tokenizer.convert_tokens_to_ids("<")

    def push(module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] > 1:  # the prefill, which samples the reply's first token
            out.logits[:, -1, lt] += 20.0
        return out

    strict = {"type": "function", "function": {**ORDER_TOOL["function"], "strict": True}}
    c = client(url)
    hook = app.state.server.model.register_forward_hook(push, with_kwargs=True)
    try:
        replies = {
            k: c.chat.completions.create(model="m", messages=MSGS, tools=[tool], max_tokens=64, temperature=0)
            for k, tool in (("strict", strict), ("free", ORDER_TOOL))
        }
    finally:
        hook.remove()
    [call] = replies["strict"].choices[0].message.tool_calls
    assert call.function.name == "check_order_status" and list(json.loads(call.function.arguments)) == ["order_id"]
    assert replies["strict"].choices[0].finish_reason == "tool_calls"
    free = replies["free"].choices[0].message
    assert free.tool_calls is None and free.content.startswith("<")
    bad = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "object", "oneOf": []}}}
    with pytest.raises(openai.BadRequestError, match=r"tools\.0\.function\.parameters: unsupported keyword 'oneOf'"):
        c.chat.completions.create(model="m", messages=MSGS, tools=[bad], max_tokens=4)


def test_a_vanishing_temperature_decodes_greedily(server):
    url, _ = server
    r = client(url).chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=1.9e-223)
    assert r.choices[0].message.content is not None


def test_bearer_token_required_except_health(server):
    url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSGS}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_reload_keeps_in_flight_requests(server):
    url, app = server
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(lambda: client(url).chat.completions.create(model="m", messages=MSGS, max_tokens=4))
            for _ in range(4)
        ]
        app.state.server.reload()
        assert all(f.result().choices[0].message.content is not None for f in futures)
    assert client(url).models.list().data[0].id == app.state.server.name != "tiny-1"
    assert metric(url, "model_reloads_total") == 1


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_only_the_documented_errors(server, mode):
    """Requests generated from the server's own OpenAPI schema (schemathesis, through hypothesis:
    its pytest plugin does not load under this pytest), valid ones and invalid ones, with the key:
    no 5xx, every status and body as the schema documents them (400 for a bad body, not FastAPI's
    422), and every 400 names the field first."""
    url, app = server
    schema = schemathesis.openapi.from_dict(app.openapi())
    tried = []

    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and operation.method == "get":  # no parameters: nothing to make invalid
            continue

        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            response = case.call_and_validate(
                base_url=url,
                headers={"Authorization": f"Bearer {KEY}"},
                # the limits (max_tokens, prompt length) are the server's settings, not the schema's
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )
            tried.append(response.status_code)
            assert response.status_code < 500
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] == response.status_code and error["message"]
                if response.status_code == 400:
                    assert re.match(r"^[A-Za-z_][\w.]*[: ]", error["message"]), error["message"]

        call()
    assert len(tried) >= 25 and (mode == "positive" or 400 in tried)


def test_the_schema_documents_400_not_422(server):
    _, app = server
    responses = app.openapi()["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "429"} <= set(responses) and "422" not in responses
