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

from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

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
    parser = JsonSchemaParser(schema, CharacterLevelParserConfig(force_json_field_order=True))
    data = enforcer_data(tokenizer)
    enforcer = TokenEnforcer(data, parser)
    blank = blank_tokens(data)

    def allowed(tokens: list[int]) -> list[int]:
        allowed = enforcer.get_allowed_tokens(tokens).allowed_tokens
        # Whitespace-only tokens are never needed, and a weak model spends its budget on them
        # (lm-format-enforcer's max_consecutive_whitespaces misses tokens of several characters).
        return [t for t in allowed if t not in blank] or allowed

    return allowed


@functools.lru_cache(maxsize=4)
def blank_tokens(data: TokenEnforcerTokenizerData) -> frozenset[int]:
    return frozenset(i for i, text, _ in data.regular_tokens if not text.strip())


def schema_key(schema: dict) -> str:
    """The schema as one canonical string: requests with equal schemas batch together."""
    return json.dumps(schema, sort_keys=True)
