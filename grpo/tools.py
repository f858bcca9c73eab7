"""Tools a scenario can give the agent, executed against the scenario's own backend data.

A scenario names its tools (``tools: [check_order_status, process_refund]``) and carries the data
they read and write (``backend: {orders: {...}}``). :data:`TOOLS` is the registry: each tool has a
JSON-schema description (the form chat templates and OpenAI's API take) and the backend table it
needs; :func:`call_tool` runs one call on a copy-per-episode of the backend and returns the text of
the tool message. Bad calls (unknown tool, wrong arguments, unknown ids) return an error text rather
than raising, so an episode never crashes on a malformed call.

Backend tables:

==================  ================================================================================
table               shape
==================  ================================================================================
orders              ``{order_id: {status, items, total, refundable, refunded?}}``
accounts            ``{account_id: {name, plan, balance, ...}}``
knowledge_base      ``[{title, text}]``
tickets             ``[{summary, priority}]`` (written by ``create_ticket``; may start empty)
==================  ================================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


class ToolError(ValueError):
    """A tool call that cannot be executed; its message goes back to the agent."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments
    table: str | None  # backend table the tool needs to exist, None if it creates it
    run: Callable[[dict, dict], dict]
    key: str | None = None  # the argument that names a record of ``table`` (an order or account id)

    def schema(self) -> dict:
        """OpenAI / chat-template function description."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def _obj(**props: str) -> dict:
    return {
        "type": "object",
        "properties": {k: {"type": "string", "description": v} for k, v in props.items()},
        "required": list(props),
    }


def _order(backend: dict, args: dict) -> tuple[str, dict]:
    oid = str(args.get("order_id", "")).strip().lstrip("#")
    orders = backend.get("orders", {})
    if oid not in orders:
        raise ToolError(f"no order {oid!r}; known orders: {', '.join(sorted(orders)) or 'none'}")
    return oid, orders[oid]


def check_order_status(backend: dict, args: dict) -> dict:
    oid, order = _order(backend, args)
    return {"order_id": oid, **{k: v for k, v in order.items() if k != "refundable"}}


def process_refund(backend: dict, args: dict) -> dict:
    oid, order = _order(backend, args)
    if order.get("refunded"):
        raise ToolError(f"order {oid} was already refunded")
    if not order.get("refundable", False):
        raise ToolError(f"order {oid} is not eligible for a refund (status {order.get('status')!r})")
    order["refunded"] = True
    return {"order_id": oid, "refunded": order.get("total"), "status": "refund issued, 3-5 business days"}


def lookup_account(backend: dict, args: dict) -> dict:
    aid = str(args.get("account_id", "")).strip()
    accounts = backend.get("accounts", {})
    if aid not in accounts:
        raise ToolError(f"no account {aid!r}")
    return {"account_id": aid, **accounts[aid]}


def search_knowledge_base(backend: dict, args: dict) -> dict:
    query = set(re.findall(r"[a-z0-9]+", str(args.get("query", "")).lower()))
    if not query:
        raise ToolError("query must not be empty")
    articles = backend.get("knowledge_base", [])
    scored = sorted(
        articles, key=lambda a: -len(query & set(re.findall(r"[a-z0-9]+", (a["title"] + " " + a["text"]).lower())))
    )
    return {"results": scored[:2]}


def create_ticket(backend: dict, args: dict) -> dict:
    summary = str(args.get("summary", "")).strip()
    if not summary:
        raise ToolError("summary must not be empty")
    tickets = backend.setdefault("tickets", [])
    tickets.append({"summary": summary, "priority": str(args.get("priority", "normal"))})
    return {"ticket_id": f"T-{len(tickets):04d}", "status": "open"}


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in [
        Tool(
            "check_order_status",
            "Look up an order's status, items and total.",
            _obj(order_id="the order number"),
            "orders",
            check_order_status,
            "order_id",
        ),
        Tool(
            "process_refund",
            "Refund an order in full if it is eligible.",
            _obj(order_id="the order number"),
            "orders",
            process_refund,
            "order_id",
        ),
        Tool(
            "lookup_account",
            "Look up a customer account.",
            _obj(account_id="the account id"),
            "accounts",
            lookup_account,
            "account_id",
        ),
        Tool(
            "search_knowledge_base",
            "Search help articles and the product catalogue.",
            _obj(query="search words"),
            "knowledge_base",
            search_knowledge_base,
        ),
        Tool(
            "create_ticket",
            "Open a support ticket for follow-up by a specialist.",
            {
                "type": "object",
                "properties": {
                    "summary": {"type": "string", "description": "what the problem is"},
                    "priority": {"type": "string", "enum": ["low", "normal", "high"]},
                },
                "required": ["summary", "priority"],
            },
            None,
            create_ticket,
        ),
    ]
}


def unresolved(tools: list[str], backend: dict) -> tuple[list[str], list[str]]:
    """(tools not in the registry, tools whose backend table is missing) for a scenario."""
    unknown = [t for t in tools if t not in TOOLS]
    unbacked = [t for t in tools if t in TOOLS and TOOLS[t].table and TOOLS[t].table not in backend]
    return unknown, unbacked


def call_tool(name: str, arguments: dict | str, allowed: list[str], backend: dict) -> tuple[str, bool]:
    """Execute one call; return (tool message text, success). Never raises on a bad call. A call
    parsed as malformed (``name == ""``) carries the reason in ``arguments``."""
    try:
        if not name:
            raise ToolError(str(arguments))
        if name not in allowed:
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(allowed) or 'none'}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                raise ToolError(f"arguments are not valid JSON: {e.msg}") from None
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        return json.dumps(TOOLS[name].run(backend, arguments)), True
    except ToolError as e:
        return json.dumps({"error": str(e)}), False


CALL_FORMAT = '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>'
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_PATTERN = re.compile(rf"{re.escape(CALL_OPEN)}(.*?)(?:{re.escape(CALL_CLOSE)}|$)", re.S)
PARTIAL_CLOSES = [CALL_CLOSE[:k] for k in range(len(CALL_CLOSE) - 1, 1, -1)]  # "</tool_call", ..., "</"


def schemas(tools: list[str]) -> list[dict]:
    """The OpenAI-style function schemas of a scenario's tools, for chat templates with tool support."""
    return [TOOLS[t].schema() for t in tools if t in TOOLS]


# An id as a user writes one: "48213", "#48213", "L-20931" (four digits or more, so that "4,200"
# points or "59.90" are not ids).
ID_PATTERN = re.compile(r"\b(?:[A-Z]+-)?\d{4,}\b")


def given_ids(text: str) -> tuple[str, ...]:
    """The ids in ``text`` (:data:`ID_PATTERN`), each once, in order."""
    return tuple(dict.fromkeys(ID_PATTERN.findall(text)))


def grounded_schemas(tools: list[str], ids: tuple[str, ...]) -> list[dict]:
    """:func:`schemas` for strict calls in a conversation whose user has given ``ids``
    (:func:`given_ids`): a tool's key argument (its order or account id) may only be one of them, and
    a tool with a key is left out while the user has given none. A 135M policy otherwise calls
    ``check_order_status`` with a number it makes up: 7 of 17 calls of the SFT policy's held-out
    rollouts did (README "Supervised warm start"). With no tool left, no call can begin."""
    out = []
    for schema in schemas(tools):
        key = TOOLS[schema["function"]["name"]].key
        if key is None:
            out.append(schema)
        elif ids:
            params = schema["function"]["parameters"]
            props = {**params["properties"], key: {**params["properties"][key], "enum": list(ids)}}
            out.append({**schema, "function": {**schema["function"], "parameters": {**params, "properties": props}}})
    return out


def template_declares_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument (Qwen, Llama 3.1, Hermes
    ... do; SmolLM2's does not)."""
    template = tokenizer.chat_template or ""
    return "tools" in (template if isinstance(template, str) else " ".join(template.values()))


def instructions(tools: list[str]) -> str:
    """The system-prompt text that declares a scenario's tools and the documented call format, with
    an example call of the first tool. (SmolLM2's chat template has no tool support, so the
    declaration is plain text, one line per tool rather than the JSON schemas: the schemas made a
    tool scenario's prompt 227 tokens against 61 without, and GRPO's cost grows with it. The call
    format is the Hermes/Qwen one, which templates with tool support also use.)"""
    return declare(schemas(tools))


def declare(functions: list[dict]) -> str:
    """:func:`instructions` for OpenAI function schemas (``{"type": "function", "function":
    {name, description, parameters}}``): the server declares a request's ``tools`` with it."""
    known = [f["function"] for f in functions]
    lines = [
        f"- {f['name']}({', '.join((f.get('parameters') or {}).get('properties', {}))}): {f.get('description') or ''}"
        for f in known
    ]
    example = (
        json.dumps(
            {
                "name": known[0]["name"],
                "arguments": {a: "..." for a in (known[0].get("parameters") or {}).get("required", [])},
            }
        )
        if known
        else ""
    )
    return (
        "\nYou can use these tools:\n"
        + "\n".join(lines)
        + f"\nTo call one, reply with only <tool_call>{example}</tool_call>. "
        "Its result comes back in a message from the tool; then answer the user."
    )


def call_text(name: str, arguments: dict) -> str:
    """A call in the documented format, as the policy writes it."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def training_form(
    messages: list[dict], functions: list[dict] | None, template_tools: bool
) -> tuple[list[dict], list[dict] | None]:
    """An OpenAI-style conversation (``tool`` messages, assistant ``tool_calls`` with JSON-string
    arguments) and its function schemas, as the policy saw them in training (grpo/rollout.py):
    ``(messages, tools)`` for ``render``. A call is written out in the documented format as the
    assistant's text, since in training an assistant message is the text the policy wrote. Where
    the chat template declares tools, the schemas go to the template; otherwise the declaration is
    appended to the system prompt (a system message is added if there is none). Raises
    ``ValueError`` naming the message whose call arguments are not a JSON object."""
    out = []
    for i, m in enumerate(messages):
        text = [m["content"]] if m.get("content") else []
        for j, c in enumerate(m.get("tool_calls") or []):
            try:
                args = json.loads(c["function"]["arguments"] or "{}")
            except json.JSONDecodeError:
                args = None
            if not isinstance(args, dict):
                raise ValueError(f"messages.{i}.tool_calls.{j}.function.arguments: a JSON object is needed")
            text.append(call_text(c["function"]["name"], args))
        out.append({"role": m["role"], "content": "\n".join(text)})
    if not functions or template_tools:
        return out, functions or None
    declaration = declare(functions)
    if out and out[0]["role"] == "system":
        out[0]["content"] += declaration
    else:
        out.insert(0, {"role": "system", "content": declaration.lstrip("\n")})
    return out, None


def parse_call(text: str) -> tuple[str, dict | str] | None:
    """``(name, arguments)`` of the first tool call in an agent reply, ``None`` if it makes none.
    A call is ``<tool_call>{json}</tool_call>`` (Hermes, Qwen, our documented format) or a reply
    that is only a JSON object with a ``name`` and ``arguments`` or ``parameters`` (Llama 3.1's
    format). A malformed call comes back as ``("", reason)`` so the caller can report it to the agent."""
    m = CALL_PATTERN.search(text or "")
    if not m:
        try:
            bare = json.loads((text or "").strip())
        except json.JSONDecodeError:
            return None
        if isinstance(bare, dict) and isinstance(bare.get("name"), str) and ({"arguments", "parameters"} & set(bare)):
            return bare["name"], bare.get("arguments", bare.get("parameters"))
        return None
    body = m.group(1).strip()
    if not m.group(0).endswith(CALL_CLOSE):  # the turn ended inside the closing tag: the call is whole
        body = next((body[: -len(p)] for p in PARTIAL_CLOSES if body.endswith(p)), body)
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return "", f"the tool call is not valid JSON ({e.msg}); use {CALL_FORMAT}"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return "", f'the tool call needs a "name"; use {CALL_FORMAT}'
    return call["name"], call.get("arguments", {})
