"""Scenarios: what a conversation is about, who the user is and what a good agent does.

A scenario file is YAML: ``schema_version`` and a list ``scenarios`` of mappings with the fields of
:class:`Scenario` (README.md, "Scenario files", has the table). :class:`Scenario` is the schema: a
pydantic model, so wrong types, missing and unknown fields fail with the file, the entry and the
field named. Content rules (allowed domains, length bounds, unique ids, tools that resolve) are the
Great Expectations suite's job (:mod:`grpo.validation`), because they must also hold for imported
and expanded scenarios.

Schema versions: 1 was a bare YAML list without ``goal``, tools or backend data; it gets a clear
migration error. 2 is current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 2
DOMAINS = ("customer_service", "technical_support", "sales", "tutoring")
DIFFICULTIES = ("easy", "medium", "hard")

SYSTEM_PROMPTS = {
    "customer_service": "You are a friendly, professional customer service agent. Help the customer resolve their issue.",
    "technical_support": "You are a patient technical support agent. Diagnose the problem and give clear steps.",
    "sales": "You are an honest, helpful sales assistant. Understand the customer's needs and recommend fitting options.",
    "tutoring": "You are an encouraging tutor. Explain step by step and check the student's understanding.",
}


class ScenarioError(ValueError):
    """Scenario input cannot be read; the message names the file and, where known, the entry and field."""


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    domain: str = Field(description=f"one of {', '.join(DOMAINS)}")
    persona: str = Field(description="who the user is; the LLM user simulator plays this")
    goal: str = Field(description="what the user wants out of the conversation")
    opening: str = Field(description="the user's first message")
    followups: list[str] = Field(default_factory=list, description="scripted user replies, one per later agent turn")
    expected_behaviours: list[str] = Field(default_factory=list, description="what a good agent does, in words")
    example_responses: list[str] = Field(
        default_factory=list, description="good agent replies (imports: the reference reply)"
    )
    keywords: list[str] = Field(default_factory=list, description="words a good answer tends to use")
    tools: list[str] = Field(default_factory=list, description="tool names from grpo.tools.TOOLS the agent may call")
    backend: dict[str, Any] = Field(
        default_factory=dict, description="data the tools read and write (orders, accounts ...)"
    )
    success_criteria: list[str] = Field(default_factory=list, description="what must be true at the end for success")
    difficulty: str = "medium"
    tags: list[str] = Field(default_factory=list)
    family: str = Field("", description="scenarios derived from one seed share it; never split across train/eval")
    source: str = Field("", description="file it came from (filled in on load)")

    def model_post_init(self, _ctx) -> None:
        if not self.family:
            self.family = self.id

    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS.get(self.domain, SYSTEM_PROMPTS["customer_service"])

    def first_messages(self, declare_tools: bool = True) -> list[dict]:
        """System prompt and opening. With ``declare_tools`` the scenario's tools are declared in the
        system prompt as text; without, the caller's chat template declares them."""
        from grpo.tools import instructions

        system = self.system_prompt() + (instructions(self.tools) if self.tools and declare_tools else "")
        return [{"role": "system", "content": system}, {"role": "user", "content": self.opening}]


def describe(err: ValidationError) -> str:
    """pydantic's errors as 'field X: problem' phrases."""
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "missing":
            out.append(f"missing field {loc!r}")
        elif e["type"] == "extra_forbidden":
            out.append(f"unknown field {loc!r}")
        else:
            out.append(f"field {loc!r}: {e['msg']} (got {type(e.get('input')).__name__})")
    return "; ".join(out)


def parse(entries: list, where: str) -> list[Scenario]:
    out = []
    for i, entry in enumerate(entries):
        label = f"{where}: entry {i}" + (
            f" (id {entry.get('id')!r})" if isinstance(entry, dict) and "id" in entry else ""
        )
        if not isinstance(entry, dict):
            raise ScenarioError(f"{label}: expected a mapping, got {type(entry).__name__}")
        try:
            out.append(Scenario(**{"source": where, **entry}))
        except ValidationError as e:
            raise ScenarioError(f"{label}: {describe(e)}") from None
    return out


def load_file(path: Path) -> list[Scenario]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        raise ScenarioError(f"{path}: file is empty")
    if isinstance(raw, list):
        raise ScenarioError(
            f"{path}: schema version 1 (a bare list of scenarios) is no longer read. Migrate it: "
            f"put the list under 'scenarios:', add 'schema_version: {SCHEMA_VERSION}' above it, "
            "and give each scenario a 'goal' (README.md, 'Scenario files')."
        )
    if not isinstance(raw, dict) or "scenarios" not in raw:
        raise ScenarioError(
            f"{path}: expected a mapping with 'schema_version' and 'scenarios', got {type(raw).__name__}"
        )
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ScenarioError(
            f"{path}: schema_version {version!r} is not supported; this code reads version {SCHEMA_VERSION}"
        )
    if not isinstance(raw["scenarios"], list):
        raise ScenarioError(f"{path}: 'scenarios' must be a list, got {type(raw['scenarios']).__name__}")
    return parse(raw["scenarios"], str(path))


def load_dir(directory: str | Path) -> list[Scenario]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ScenarioError(f"{directory}: scenario directory not found")
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        raise ScenarioError(f"{directory}: no *.yaml scenario files")
    return [s for f in files for s in load_file(f)]


# Parquet holds lists of strings natively; the free-form backend is stored as a JSON string.
def to_frame(scenarios: list[Scenario]) -> pd.DataFrame:
    return pd.DataFrame([{**s.model_dump(), "backend": json.dumps(s.backend, sort_keys=True)} for s in scenarios])


def from_frame(df: pd.DataFrame) -> list[Scenario]:
    out = []
    for r in df.to_dict("records"):
        r = {k: (list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v) for k, v in r.items()}
        out.append(Scenario(**{**r, "backend": json.loads(r["backend"])}))
    return out


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split(df: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split by family, stratified by domain and difficulty.

    Each domain sends ``round(n * eval_fraction)`` of its n families to eval (at least one when it
    has two or more). They are picked evenly spaced from the domain's families sorted by difficulty
    and then by a seeded hash of the family name, so difficulties are represented in proportion and
    file order plays no part. All scenarios of a family land on the same side."""
    fam = df.drop_duplicates("family")[["family", "domain", "difficulty"]]
    level = {d: i for i, d in enumerate(DIFFICULTIES)}
    eval_families = set()
    for _, group in fam.groupby("domain", sort=True):
        ordered = sorted(
            zip(group["difficulty"], group["family"]), key=lambda x: (level.get(x[0], len(level)), _rank(seed, x[1]))
        )
        names = [f for _, f in ordered]
        n = len(names)
        n_eval = max(1, round(n * eval_fraction)) if n > 1 else 0
        eval_families.update(names[int((k + 0.5) * n / n_eval)] for k in range(n_eval))
    is_eval = df["family"].isin(eval_families)
    return df[~is_eval].reset_index(drop=True), df[is_eval].reset_index(drop=True)


def leaked_families(train: pd.DataFrame, evaluation: pd.DataFrame) -> list[str]:
    """Families with scenarios on both sides. A multi-issue family 'a+b' counts as both a and b."""

    def parts(df):
        return {p for f in df["family"] for p in f.split("+")}

    return sorted(parts(train) & parts(evaluation))


def subsample(scenarios: list[Scenario], n: int | None, seed: int) -> list[Scenario]:
    """At most n scenarios, the same ones on every run, spread over domains round-robin."""
    if not n or n >= len(scenarios):
        return scenarios
    by_domain: dict[str, list[Scenario]] = {}
    for s in sorted(scenarios, key=lambda s: _rank(seed, s.id)):
        by_domain.setdefault(s.domain, []).append(s)
    out, queues = [], [by_domain[d] for d in sorted(by_domain)]
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out, key=lambda s: s.id)
