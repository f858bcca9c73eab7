"""An OpenAI-compatible chat server for a policy: ``/v1/chat/completions``, ``/v1/models``,
``/health`` and ``/metrics`` (Prometheus).

Requests are batched continuously (grpo/batching.py): a request joins the running batch between
decoding steps, with the others that arrived within ``batch_wait_s`` of it, and leaves it as soon
as it is finished. Each row samples with its own request's temperature, top_p and seed, and its
own ``response_format`` schema, so a seeded reply does not depend on its batch. With
``stream: true`` the reply is sent as server-sent-event chunks in OpenAI's format, token by token
as they are sampled; a request that declares tools gets its reply in one piece at the end, since
whether it is a call is known only then. ``tools`` and ``tool`` messages
are rendered as the policy saw them in training (grpo/tools.py: ``training_form``), and a reply
that calls one of the request's tools comes back as ``tool_calls`` (one call per reply, as in
training). ``response_format`` with a JSON schema constrains generation to it (structured outputs,
grpo/structured.py). The app knows nothing of MLflow: it is given a ``load`` callable that returns
``(model, tokenizer, model_name)``, and ``app.state.server.reload()`` swaps in a new model without
dropping requests in flight: they finish on the model they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2.exceptions import TemplateError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from grpo.batching import ContinuousBatch, Row
from grpo.config import Limits
from grpo.rollout import decode_reply, encode, render
from grpo.structured import call_constraint, check_schema, schema_constraint, schema_key
from grpo.tools import parse_call, template_declares_tools, training_form


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=16)
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def content_or_calls(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (null only on an assistant message with tool_calls)")
        return self


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(default=None, description="JSON Schema of the arguments (an object)")
    strict: bool | None = Field(
        default=None,
        description="true on every declared function: a reply that begins like a call is decoded under the "
        "functions' schemas (the subset grpo/structured.py enforces), as rollouts decode calls in training",
    )

    @model_validator(mode="after")
    def object_schema(self):
        params = self.parameters or {}
        props, required = params.get("properties", {}), params.get("required", [])
        if not isinstance(props, dict) or not (
            isinstance(required, list) and all(isinstance(r, str) for r in required)
        ):
            raise ValueError("parameters: properties must be an object and required a list of names")
        return self


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaFormat(BaseModel):
    name: str = Field(max_length=64)
    schema_: dict = Field(alias="schema", description="JSON Schema, the subset grpo/structured.py enforces")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**63,
        description="the same seed, request and model give the same reply, whichever requests share its batch",
    )
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, max_length=64)
    tool_choice: Literal["none", "auto"] | None = Field(
        default=None, description="auto (the default with tools): the model may call one; none: tools are not declared"
    )


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Pending:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int  # the request's, or a random one: the row's own random stream (grpo/rollout.py RowSampler)
    schema: str | None  # the JSON schema of response_format (schema_key), or None
    calls: str | None  # the functions whose calls are strict (JSON), or None
    future: asyncio.Future
    queued: float  # the event loop's time when it was queued
    tokens: asyncio.Queue | None = None  # streamed: each sampled token as it comes, then None
    sent: int = 0  # tokens put on ``tokens`` so far


class Server:
    """Holds the model, the batching queue and the metrics."""

    def __init__(self, load: Callable[[], tuple], limits: Limits, api_key: str | None = None):
        self.load, self.limits, self.api_key = load, limits, api_key
        self.model, self.tokenizer, self.name = load()
        self.lock = threading.Lock()  # reload waits for the decoding step in progress
        # Every step runs on this one thread: torch's OpenMP workers belong to the thread that calls
        # them, and the idle workers of other calling threads spin beside the step (with
        # asyncio.to_thread, 29-41 completion tokens/s at concurrency 8 against 41-50; bench/README.md).
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.queue: asyncio.Queue | None = None
        self.in_flight = 0
        reg = self.registry = CollectorRegistry()
        self.m_requests = Counter("chat_requests_total", "Chat completion requests", ["status"], registry=reg)
        self.m_latency = Histogram("chat_request_seconds", "Request latency", registry=reg)
        self.m_prefills = Counter(
            "prefill_calls_total",
            "Prefills: each admits the requests queued together into the running batch",
            registry=reg,
        )
        self.m_batch = Histogram(
            "prefill_batch_size", "Requests admitted per prefill", buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg
        )
        self.m_steps = Histogram(
            "decode_batch_size",
            "Requests in the batch at each decoding step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=reg,
        )
        self.m_tokens = Counter("completion_tokens_total", "Generated tokens", registry=reg)
        self.m_inflight = Gauge("requests_in_flight", "Requests queued or running", registry=reg)
        self.m_reloads = Counter("model_reloads_total", "Model reloads", registry=reg)
        self.m_tool_calls = Counter(
            "tool_calls_total",
            "Replies holding a tool call: returned as tool_calls, or malformed (as text)",
            ["outcome"],
            registry=reg,
        )

    def reload(self) -> None:
        model, tokenizer, name = self.load()
        with self.lock:  # swap between decoding steps; the running batch finishes on its own model
            self.model, self.tokenizer, self.name = model, tokenizer, name
        self.m_reloads.inc()

    def advance(self, batch: ContinuousBatch, admit: list[Pending]) -> list[Row]:
        """Prefill ``admit`` into ``batch`` (each gets its first token), or else take one decoding
        step for every running row; returns the rows that finished. Runs in a worker thread."""
        with self.lock:
            if admit:
                constraints = {
                    p.schema: schema_constraint(self.tokenizer, json.loads(p.schema)) for p in admit if p.schema
                } | {p.calls: call_constraint(self.tokenizer, json.loads(p.calls)) for p in admit if p.calls}
                # Below 1e-3, logits / temperature overflows (found by the fuzzing test: 1.9e-223
                # gave a 500) and the distribution is the argmax anyway: such a row is greedy.
                temperature = [p.temperature if p.temperature >= 1e-3 else 0.0 for p in admit]
                rows = [
                    Row(p.prompt, p.max_tokens, p.seed, t, p.top_p, allowed=constraints.get(p.schema or p.calls), tag=p)
                    for p, t in zip(admit, temperature)
                ]
                batch.admit(rows)
                self.m_prefills.inc()
                self.m_batch.observe(len(admit))
            else:
                self.m_steps.observe(len(batch.rows))
                batch.step()
            return batch.pop_finished()

    async def worker(self) -> None:
        """Admits queued requests into the running batch and steps it. A request waits up to
        ``batch_wait_s`` for others to be prefilled with it, or less once they fill the room left."""
        loop = asyncio.get_running_loop()
        batch: ContinuousBatch | None = None
        waiting: list[Pending] = []
        while True:
            running = batch is not None and bool(batch.rows)
            if not waiting and not running:
                waiting.append(await self.queue.get())
            while not self.queue.empty():
                waiting.append(self.queue.get_nowait())
            waiting = [p for p in waiting if not p.future.done()]  # their clients went away
            if batch is None or (not running and batch.model is not self.model):
                batch = ContinuousBatch(self.model, self.tokenizer.eos_token_id)  # the model after a reload
            for row in batch.rows:
                row.stopped = row.tag.future.done()
            room = self.limits.max_batch - len(batch.rows) if batch.model is self.model and batch.accepts() else 0
            admit: list[Pending] = []
            if waiting and room:
                wait = waiting[0].queued + self.limits.batch_wait_s - loop.time()
                if wait <= 0 or len(waiting) >= room:
                    admit, waiting = waiting[:room], waiting[room:]
                elif not running:  # idle: wait for more to come
                    with contextlib.suppress(TimeoutError):
                        waiting.append(await asyncio.wait_for(self.queue.get(), wait))
                    continue
            if not admit and not batch.rows:
                continue
            try:
                finished = await loop.run_in_executor(self.decoder, self.advance, batch, admit)
            except Exception as e:  # a failed step fails its requests, not the server
                for p in admit + [r.tag for r in batch.rows]:
                    self.end(p, error=e)
                batch = None
                continue
            for row in batch.rows + finished:
                p = row.tag
                if p.tokens is not None:
                    for token in row.tokens[p.sent :]:
                        p.tokens.put_nowait(token)
                p.sent = len(row.tokens)
            for row in finished:
                self.end(row.tag, row.tokens)

    @staticmethod
    def end(p: Pending, tokens: list[int] | None = None, error: Exception | None = None) -> None:
        if p.tokens is not None:
            p.tokens.put_nowait(None)
        if not p.future.done():
            p.future.set_result(tokens) if error is None else p.future.set_exception(error)

    def admit(self, req: ChatRequest) -> tuple[Pending, list[dict]]:
        """Check ``req`` (an ApiError names what is wrong) and queue it; ``(pending, functions declared)``.
        A streamed request without tools gets its tokens as they are sampled (``pending.tokens``)."""
        limit = req.max_completion_tokens or req.max_tokens or self.limits.max_tokens
        if limit > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {limit} exceeds this server's limit of {self.limits.max_tokens}")
        functions = [t.model_dump() for t in req.tools or []] if req.tool_choice != "none" else []
        try:
            messages, tools = training_form(
                [m.model_dump() for m in req.messages], functions, template_declares_tools(self.tokenizer)
            )
            prompt = encode(self.tokenizer, render(self.tokenizer, messages, True, tools))
        except (ValueError, TemplateError) as e:
            raise ApiError(400, f"messages: {e}" if isinstance(e, TemplateError) else str(e)) from None
        if len(prompt) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(prompt)} tokens; the limit is {self.limits.max_prompt_tokens}")
        schema = None
        if req.response_format and req.response_format.type == "json_schema":
            if req.response_format.json_schema is None:
                raise ApiError(400, "response_format: json_schema is required when type is json_schema")
            try:
                check_schema(req.response_format.json_schema.schema_, "response_format.json_schema.schema")
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            schema = schema_key(req.response_format.json_schema.schema_)
        calls = None
        if functions and all(f["function"].get("strict") for f in functions):
            for i, f in enumerate(functions):
                try:
                    check_schema(f["function"]["parameters"] or {"type": "object"}, f"tools.{i}.function.parameters")
                except ValueError as e:
                    raise ApiError(400, f"{e} (with strict: true)") from None
            calls = None if schema else json.dumps(functions, sort_keys=True)  # response_format comes first
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(429, "too many concurrent requests", "rate_limit_error")
        self.in_flight += 1
        self.m_inflight.set(self.in_flight)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.add_done_callback(self.release)  # also when a streaming client has gone away
        tokens = asyncio.Queue() if req.stream and not functions else None
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        pending = Pending(prompt, limit, req.temperature, req.top_p, seed, schema, calls, fut, loop.time(), tokens)
        self.queue.put_nowait(pending)
        return pending, functions

    def release(self, _future: asyncio.Future) -> None:
        self.in_flight -= 1
        self.m_inflight.set(self.in_flight)

    async def complete(self, req: ChatRequest) -> dict:
        pending, functions = self.admit(req)
        return self.result(pending.prompt, await pending.future, functions)

    def result(self, prompt: list[int], ids: list[int], functions: list[dict]) -> dict:
        """The chat completion of the sampled ``ids``: a tool call as ``tool_calls`` where one was declared."""
        finished = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
        text = decode_reply(self.tokenizer, ids)
        self.m_tokens.inc(len(ids))
        message, finish = {"role": "assistant", "content": text}, "stop" if finished else "length"
        call = parse_call(text) if functions else None
        if call is not None:
            name, args = call
            if isinstance(args, str):
                with contextlib.suppress(json.JSONDecodeError):
                    args = json.loads(args)
            # a malformed call, or one of a tool the request did not declare, is returned as text
            valid = name in {f["function"]["name"] for f in functions} and isinstance(args, dict)
            self.m_tool_calls.labels("returned" if valid else "malformed").inc()
            if valid:
                before = text.split("<tool_call>")[0].strip() if "<tool_call>" in text else ""
                function = {"name": name, "arguments": json.dumps(args)}
                message = {
                    "role": "assistant",
                    "content": before or None,
                    "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}],
                }
                finish = "tool_calls"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(ids),
                "total_tokens": len(prompt) + len(ids),
            },
        }

    async def stream(self, pending: Pending, functions: list[dict], t0: float):
        """Server-sent events of ``pending``'s reply (:meth:`events`). When the client goes away
        first, starlette stops the stream, and the request leaves the batch at its next step."""
        try:
            async for event in self.events(pending, functions, t0):
                yield event
        finally:
            pending.future.cancel()  # nothing to cancel once it is answered

    async def events(self, pending: Pending, functions: list[dict], t0: float):
        """The text as it is sampled, each chunk what the reply's decoded text gained (held back
        while it ends in a partial character); with tools declared, the whole reply at the end
        (:func:`stream_chunks`)."""
        tokenizer = self.tokenizer
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.name}
        if pending.tokens is not None:
            yield chunk(head, {"role": "assistant", "content": ""})
            ids, sent = [], ""
            while (token := await pending.tokens.get()) is not None:
                ids.append(token)
                text = decode_reply(tokenizer, ids)
                if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                    yield chunk(head, {"content": text[len(sent) :]})
                    sent = text
        try:
            result = {**self.result(pending.prompt, await pending.future, functions), **head}
        except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI's does
            self.m_requests.labels("500").inc()
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 500}})}\n\n"
            return
        self.m_requests.labels("200").inc()
        self.m_latency.observe(time.perf_counter() - t0)
        if pending.tokens is None:
            for event in stream_chunks(result):
                yield event
            return
        text = result["choices"][0]["message"]["content"] or ""
        if len(text) > len(sent) and text.startswith(sent):
            yield chunk(head, {"content": text[len(sent) :]})
        yield chunk(head, {}, result["choices"][0]["finish_reason"])
        yield "data: [DONE]\n\n"


def chunk(head: dict, delta: dict, finish: str | None = None) -> str:
    """One server-sent event of a streamed chat completion."""
    body = {
        **head,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def stream_chunks(result: dict):
    """A finished chat completion as server-sent events: the role, the content, each tool call, the finish."""
    head = {k: result[k] for k in ("id", "created", "model")}
    choice = result["choices"][0]
    message = choice["message"]
    deltas = [({"role": "assistant", "content": ""}, None)]
    if message["content"]:
        deltas.append(({"content": message["content"]}, None))
    for i, call in enumerate(message.get("tool_calls", [])):
        deltas.append(({"tool_calls": [{"index": i, **call}]}, None))
    for delta, finish in (*deltas, ({}, choice["finish_reason"])):
        yield chunk(head, delta, finish)
    yield "data: [DONE]\n\n"


class ErrorBody(BaseModel):
    message: str = Field(description="what was wrong; for a bad request, the field first (e.g. messages.0.role)")
    type: str
    code: int


class ErrorResponse(BaseModel):
    """Every error's body, as OpenAI's API shapes it."""

    error: ErrorBody


# The errors the server returns, documented in its OpenAPI schema. A malformed body is 400, as in
# OpenAI's API (FastAPI's default would be 422, which its schema would then document instead).
ERRORS = {
    400: "malformed request: the message names the field; or over a limit",
    401: "missing or wrong bearer token (when the server has a key)",
    429: "too many concurrent requests",
}


def documented(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(load: Callable[[], tuple], limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    server = Server(load, limits or Limits(), api_key)

    async def lifespan(app):
        server.queue = asyncio.Queue()
        task = asyncio.create_task(server.worker())
        yield
        task.cancel()
        server.decoder.shutdown(wait=False)

    app = FastAPI(title="grpo-agents chat server", lifespan=lifespan)
    app.state.server = server

    def openapi() -> dict:
        """FastAPI's schema without the 422 it adds to every route with a body: we answer 400."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.middleware("http")
    async def auth(request: Request, call_next):
        wrong = request.headers.get("authorization") != f"Bearer {server.api_key}"
        if server.api_key and request.url.path != "/health" and wrong:
            return error(401, "missing or wrong bearer token", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        # the field's path (messages.0.role); a body that is not JSON at all has a character offset
        path = [] if first["type"] == "json_invalid" else first["loc"]
        where = ".".join(str(x) for x in path if x != "body") or "body"
        server.m_requests.labels("400").inc()
        return error(400, f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        """FastAPI's own errors (a body it cannot decode, an unknown path) in our error shape."""
        message = f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
        return error(exc.status_code, message)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name}

    @app.get("/metrics", response_class=PlainTextResponse, responses=documented(401))
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=documented(401))
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "grpo-agents"}]}

    streamed = {"content": {"text/event-stream": {}}, "description": "with stream: true, server-sent events"}

    @app.post("/v1/chat/completions", responses={200: streamed, **documented(400, 401, 429)})
    async def chat(req: ChatRequest):
        t0 = time.perf_counter()
        try:
            if req.stream:  # checked and queued before the status line goes out: a bad request is still a 400
                pending, functions = server.admit(req)
                return StreamingResponse(server.stream(pending, functions, t0), media_type="text/event-stream")
            result = await server.complete(req)
        except ApiError as e:
            server.m_requests.labels(str(e.status)).inc()
            return error(e.status, e.message, e.kind)
        server.m_requests.labels("200").inc()
        server.m_latency.observe(time.perf_counter() - t0)
        return result

    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", startup_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a daemon thread; yield its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the chat server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
