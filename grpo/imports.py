"""Bring your own conversations: turn chat logs and tables into scenarios, masking PII on the way.

A source is a mapping (one entry of ``prepare.sources`` in params.yaml):

==============  ===============================================================================
key             meaning
==============  ===============================================================================
path            a file, or a directory for ``format: hf``
format          ``jsonl`` | ``parquet`` | ``csv`` | ``hf`` (a ``datasets.save_to_disk`` directory)
domain          domain for rows that do not carry one (required unless every row has ``domain``)
columns         for tables without a ``messages`` column: scenario field -> column name.
                ``opening`` is required; ``example_response``, ``id``, ``family``, ``domain`` and
                ``persona`` are optional; ``tags`` is a list of columns, each becoming
                ``"<column>:<value>"``
persona         default persona; difficulty: default difficulty (``medium``)
split           for ``format: hf`` with several splits: which one (``train``)
==============  ===============================================================================

Chat rows hold ``messages``: the OpenAI list of ``{role, content}`` with roles ``system``,
``user``, ``assistant`` and ``tool``. The first user message becomes the opening, later user
messages the follow-ups and assistant messages the example responses; system and tool messages are
context and are not kept. Rows may also carry ``id``, ``domain``, ``persona``, ``goal`` and ``tags``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from grpo.scenarios import Scenario, ScenarioError, parse

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("jsonl", "parquet", "csv", "hf")
DEFAULT_PERSONA = "A real user whose conversation was imported; they write as in the original message."

# Masking rules. A card number must start like a Visa, Mastercard, Amex or Discover number and pass
# the Luhn check, so long order numbers stay readable (the Bitext sample's order 113542617735902
# passes Luhn). Phone numbers need a separator or a leading '+'.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6011|65")
PHONE = re.compile(r"(?<![\w])(?:\+\d{1,3}[\s.-]?)?\(?\d{2,4}\)?[\s.-]\d{3,4}[\s.-]\d{3,4}(?![\w])|\+\d{8,15}\b")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def mask_pii(text: str, counts: Counter) -> str:
    def card(m):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and CARD_PREFIX.match(digits) and luhn_ok(digits):
            counts["card"] += 1
            return "[CARD]"
        return m.group()

    def sub(kind, token):
        def f(m):
            counts[kind] += 1
            return token

        return f

    text = EMAIL.sub(sub("email", "[EMAIL]"), text)
    text = CARD.sub(card, text)
    return PHONE.sub(sub("phone", "[PHONE]"), text)


def read_rows(source: dict) -> list[dict]:
    path, fmt = Path(source["path"]), source.get("format")
    if fmt not in FORMATS:
        raise ScenarioError(f"{path}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not path.exists():
        raise ScenarioError(f"{path}: import source not found")
    if fmt == "jsonl":
        rows = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ScenarioError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ScenarioError(f"{path}: line {i}: invalid JSON: {e.msg}") from None
                if not isinstance(rows[-1], dict):
                    raise ScenarioError(f"{path}: line {i}: expected a JSON object")
        return rows
    if fmt == "hf":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[source.get("split", "train")]
        return ds.to_list()
    try:
        df = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas/pyarrow raise many types for a bad file; name the file either way
        raise ScenarioError(f"{path}: cannot read {fmt}: {e}") from None
    return df.to_dict("records")


def chat_fields(messages, where: str) -> dict:
    if not isinstance(messages, list) or not messages:
        raise ScenarioError(f"{where}: 'messages' must be a non-empty list")
    users, replies = [], []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ScenarioError(f"{where}: message {j} has no 'role'")
        if m["role"] not in ROLES:
            raise ScenarioError(f"{where}: message {j} has unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ScenarioError(f"{where}: message {j} content must be a string")
        if m["role"] == "user":
            users.append(content)
        elif m["role"] == "assistant" and content.strip():
            replies.append(content)
    if not users:
        raise ScenarioError(f"{where}: no user message")
    return {"opening": users[0], "followups": users[1:], "example_responses": replies}


def mapped_fields(row: dict, columns: dict, where: str) -> dict:
    missing = [
        c
        for c in [columns.get("opening"), columns.get("example_response"), *columns.get("tags", [])]
        if c and c not in row
    ]
    if "opening" not in columns or missing:
        raise ScenarioError(
            f"{where}: column mapping needs 'opening' and existing columns; missing: "
            f"{', '.join(missing) or 'opening'} (columns present: {', '.join(row)})"
        )
    out = {"opening": str(row[columns["opening"]])}
    if columns.get("example_response"):
        out["example_responses"] = [str(row[columns["example_response"]])]
    out["tags"] = [f"{c}:{row[c]}" for c in columns.get("tags", []) if str(row[c])]
    for key in ("id", "family", "domain", "persona"):
        if columns.get(key):
            out[key] = str(row[columns[key]])
    return out


def import_source(source: dict, mask: bool) -> tuple[list[Scenario], Counter]:
    """Scenarios from one source, and the count of masked items by kind."""
    path = Path(source["path"])
    rows = read_rows(source)
    if not rows:
        raise ScenarioError(f"{path}: no rows")
    counts: Counter = Counter()
    entries = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        if "messages" in row and not source.get("columns"):
            fields = {k: row[k] for k in ("id", "domain", "persona", "goal", "tags") if row.get(k)}
            fields.update(chat_fields(list(row["messages"]), where))
        else:
            fields = mapped_fields(row, source.get("columns") or {}, where)
        if mask:
            for k in ("opening", "persona", "goal"):
                if k in fields:
                    fields[k] = mask_pii(fields[k], counts)
            for k in ("followups", "example_responses"):
                fields[k] = [mask_pii(t, counts) for t in fields.get(k, [])]
        fields.setdefault("id", f"{path.stem}-{i + 1:05d}")
        fields.setdefault("domain", source.get("domain"))
        if not fields["domain"]:
            raise ScenarioError(f"{where}: no domain; set 'domain' on the source or a domain per row")
        fields.setdefault("persona", source.get("persona", DEFAULT_PERSONA))
        fields.setdefault("goal", f"Get a helpful answer to: {fields['opening'][:200]}")
        fields.setdefault("difficulty", source.get("difficulty", "medium"))
        fields["tags"] = [*fields.get("tags", []), f"import:{path.name}"]
        entries.append(fields)
    scenarios = parse(entries, str(path))
    return scenarios, counts
