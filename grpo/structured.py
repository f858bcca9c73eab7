"""Structured outputs: generation constrained to a JSON schema, so that the text cannot be malformed.

lm-format-enforcer does the constraining: at each step it allows only the tokens that keep the text
a valid prefix of a document the schema accepts. Its own transformers integration module does not
import under transformers 5 (it imports ``transformers.tokenization_utils``, since renamed), so the
two small pieces it holds are written here: the tokenizer table it needs (:func:`enforcer_data`)
and the per-row constraint (:func:`schema_constraint`), which the server's batch applies.

Only a subset of JSON Schema is accepted (:data:`KEYWORDS`), checked by :func:`check_schema`: the
subset lm-format-enforcer enforces, so that a schema is either refused up front, with the keyword
named, or decoded as given.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from lmformatenforcer import (
    CharacterLevelParserConfig,
    JsonSchemaParser,
    SequenceParser,
    StringParser,
    TokenEnforcer,
    TokenEnforcerTokenizerData,
)
from lmformatenforcer.consts import WHITESPACE_CHARACTERS

from grpo.tools import CALL_CLOSE, CALL_OPEN

TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "maxLength",
    "minLength",
    "title",
    "description",
}
MAX_DEPTH = 8


def check_schema(schema, path: str = "schema", depth: int = 0) -> None:
    """Raise ``ValueError`` naming the place and keyword of anything outside the supported subset."""
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be an object")
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise ValueError(f"{path}: unsupported keyword {unknown[0]!r} (supported: {', '.join(sorted(KEYWORDS))})")
    kind = schema.get("type")
    if kind not in TYPES and not ("enum" in schema or "const" in schema):
        raise ValueError(f"{path}.type: one of {', '.join(sorted(TYPES))} is needed (or enum or const)")
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values or len(values) > 256:
            raise ValueError(f"{path}.enum: a list of 1 to 256 values is needed")
        if not (all(isinstance(v, str) for v in values) or all(is_number(v) for v in values)):
            raise ValueError(f"{path}.enum: the values must be all strings or all numbers")
    if "const" in schema and not isinstance(schema["const"], (str, int, float, bool)):
        raise ValueError(f"{path}.const: a string, number or boolean is needed")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in schema and not (isinstance(schema[key], int) and not isinstance(schema[key], bool)):
            raise ValueError(f"{path}.{key}: an integer is needed")
        if key in schema and not 0 <= schema[key] <= 4096:
            raise ValueError(f"{path}.{key}: must be from 0 to 4096")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"{path}.properties: an object is needed")
    for name, sub in props.items():
        check_schema(sub, f"{path}.properties.{name}", depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        raise ValueError(f"{path}.required: a list of names from properties is needed")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        check_schema(extra, f"{path}.additionalProperties", depth + 1)
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items", depth + 1)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@functools.lru_cache(maxsize=4)
def enforcer_data(tokenizer) -> TokenEnforcerTokenizerData:
    """What lm-format-enforcer knows of a tokenizer: each regular token's text (a token that starts
    a word decodes with its leading space only after another token), built once per tokenizer."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    regular = []
    for i in range(size):
        if i in special:
            continue
        after_zero, alone = tokenizer.decode([zero, i])[1:], tokenizer.decode([i])
        regular.append((i, after_zero, len(after_zero) > len(alone)))

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens).rstrip("\ufffd")  # an incomplete UTF-8 sequence, not yet a character

    return TokenEnforcerTokenizerData(regular, decode, tokenizer.eos_token_id, False, size)


def schema_constraint(tokenizer, schema: dict) -> Callable[[list[int]], list[int]]:
    """The tokens that may follow a reply's tokens so far so that it stays a prefix of JSON that
    ``schema`` accepts; once the JSON is complete, only eos. One constraint serves many rows
    (lm-format-enforcer keeps the states of the prefixes it has seen)."""
    check_schema(schema)
    return enforcer_for(tokenizer, JsonSchemaParser(schema, PARSER_CONFIG))


PARSER_CONFIG = CharacterLevelParserConfig(force_json_field_order=True)


def enforcer_for(tokenizer, parser) -> Callable[[list[int]], list[int]]:
    """The tokens lm-format-enforcer allows after a reply's tokens under ``parser``, whitespace-only
    tokens and :func:`foreign_tokens` left out."""
    data = enforcer_data(tokenizer)
    enforcer = TokenEnforcer(data, parser)
    blank = blank_tokens(data) | foreign_tokens(data)

    def allowed(tokens: list[int]) -> list[int]:
        allowed = enforcer.get_allowed_tokens(tokens).allowed_tokens
        # Whitespace-only tokens are never needed, and a weak model spends its budget on them
        # (lm-format-enforcer's max_consecutive_whitespaces misses tokens of several characters).
        return [t for t in allowed if t not in blank] or allowed

    return allowed


# A strict call's string arguments (lm-format-enforcer may let one more through): a demonstration's
# longest is 45; with 60, calls of SFT's policy ran past a 48-token turn.
MAX_ARGUMENT_CHARS = 48


def call_schema(functions: list[dict]) -> dict:
    """The JSON of a call to one of ``functions`` (OpenAI function schemas, grpo/tools.py
    ``schemas``): its name, then arguments that function's parameters accept, string arguments at
    most :data:`MAX_ARGUMENT_CHARS` long."""

    def short(schema: dict) -> dict:
        props = {
            k: {**v, "maxLength": min(v.get("maxLength", MAX_ARGUMENT_CHARS), MAX_ARGUMENT_CHARS)}
            if v.get("type") == "string"
            else v
            for k, v in schema.get("properties", {}).items()
        }
        return {**schema, "properties": props, "additionalProperties": False}

    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": short(f.get("parameters") or {})},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in (fn["function"] for fn in functions)
        ]
    }


class _Sequence(SequenceParser):
    """lm-format-enforcer's SequenceParser that passes on the running parser's shortcut key. In a
    JSON string the enforcer then takes the string's tokens from its cache instead of walking the
    whole vocabulary: 4 to 11 ms a token instead of 3.3 to 4.2 s with SmolLM2's 49k tokens (its own
    SequenceParser passes the key on only from its last parser)."""

    def add_character(self, new_character: str):
        parser = super().add_character(new_character)
        return _Sequence(parser.parsers) if type(parser) is SequenceParser else parser

    def shortcut_key(self):
        return self.parsers[0].shortcut_key()


def call_constraint(tokenizer, functions: list[dict]) -> Callable[[list[int]], list[int] | None]:
    """Strict tool calls, as OpenAI's ``strict`` function calling and vLLM's guided decoding give
    them: a reply that begins like a call (its text so far a prefix of ``<tool_call>``, or starting
    with it) is held to a call of one of ``functions`` in the documented format (grpo/tools.py
    CALL_FORMAT), arguments their schema accepts, then eos, so it cannot be malformed or call an
    undeclared tool. A call is a whole reply, as the system prompt says ("reply with only"): after
    some text, no ``<tool_call>`` may be completed (:func:`no_call`), so no call opens partway through
    a turn (such calls ran out of the turn's tokens). Whether to call stays the model's choice: for any other
    reply, and before its first token, it returns None (any token) or bars only that completion.
    With no ``functions``, no reply may make a call (:func:`no_call`)."""
    no_calls = no_call(tokenizer)
    if not functions:
        return no_calls
    allowed = enforcer_for(
        tokenizer,
        _Sequence(
            [StringParser(CALL_OPEN), JsonSchemaParser(call_schema(functions), PARSER_CONFIG), StringParser(CALL_CLOSE)]
        ),
    )
    allowed([])  # the enforcer's root: every reply starts here, so each later prefix extends a known one

    def constraint(tokens: list[int]) -> list[int] | None:
        text = tokenizer.decode(tokens)
        if not tokens or tokenizer.eos_token_id in tokens:
            return None
        if text.startswith(CALL_OPEN) or CALL_OPEN.startswith(text):
            return allowed(tokens)
        return no_calls(tokens)  # text that is not a call: no <tool_call> completed after it

    return constraint


def no_call(tokenizer) -> Callable[[list[int]], list[int] | None]:
    """No reply may make a call: while its text is a prefix of ``<tool_call>`` (the empty one
    included), the tokens that would keep it one, or complete it, are not allowed; after some
    text, the tokens that would complete a ``<tool_call>`` are not."""
    data = enforcer_data(tokenizer)

    @functools.cache
    def allowed(text: str) -> list[int]:
        barred = {
            i
            for i, piece, _ in data.regular_tokens
            if CALL_OPEN.startswith(text + piece) or (text + piece).startswith(CALL_OPEN)
        }
        return [i for i in range(data.vocab_size) if i not in barred]

    @functools.cache
    def not_completing(tail: str) -> list[int] | None:  # tail: the text's end from its last '<', or ""
        barred = {i for i, piece, _ in data.regular_tokens if CALL_OPEN in tail + piece}
        return [i for i in range(data.vocab_size) if i not in barred] if barred else None

    def constraint(tokens: list[int]) -> list[int] | None:
        text = tokenizer.decode(tokens)
        if tokenizer.eos_token_id in tokens:
            return None
        if CALL_OPEN.startswith(text):
            return allowed(text)
        tail = text[text.rfind("<") :] if "<" in text else ""
        return not_completing(tail if CALL_OPEN.startswith(tail) else "")

    return constraint


@functools.lru_cache(maxsize=4)
def blank_tokens(data: TokenEnforcerTokenizerData) -> frozenset[int]:
    return frozenset(i for i, text, _ in data.regular_tokens if not text.strip())


@functools.lru_cache(maxsize=4)
def foreign_tokens(data: TokenEnforcerTokenizerData) -> frozenset[int]:
    """Tokens with a character that lm-format-enforcer's JSON parser accepts nowhere: outside its
    alphabet (ASCII letters, digits, space and common punctuation), the backslash of an escape and
    whitespace; 'é', '|' or a part of a character, say. Its shortcut inside a JSON string allows
    them, but its parser then refuses the character and allows nothing more: with SmolLM2's SFT
    policy, 1 of 19 strict calls ended malformed that way."""
    accepted = set(PARSER_CONFIG.alphabet) | set(WHITESPACE_CHARACTERS) | {"\\"}
    return frozenset(i for i, text, _ in data.regular_tokens if not set(text) <= accepted)


def schema_key(schema: dict) -> str:
    """The schema as one canonical string: requests with equal schemas batch together."""
    return json.dumps(schema, sort_keys=True)
