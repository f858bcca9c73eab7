"""Scenarios: what a conversation is about, who the user is and what a good agent does.

A scenario file is YAML holding a list of mappings with these fields:

==================== ======== ==========================================================
field                type     meaning
==================== ======== ==========================================================
id                   str      unique id, e.g. ``cs-late-order``
domain               str      one of :data:`DOMAINS`
persona              str      who the user is (drives an LLM user simulator later)
opening              str      the user's first message
followups            [str]    scripted user replies, one per later agent turn
expected_behaviours  [str]    what a good agent does, in words
keywords             [str]    words a good answer tends to use (scored by ``coverage``)
difficulty           str      ``easy`` | ``medium`` | ``hard``
==================== ======== ==========================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import yaml

DOMAINS = ("customer_service", "technical_support", "sales", "tutoring")
DIFFICULTIES = ("easy", "medium", "hard")
LIST_FIELDS = ("followups", "expected_behaviours", "keywords")
REQUIRED = ("id", "domain", "persona", "opening", "followups", "expected_behaviours", "keywords", "difficulty")

SYSTEM_PROMPTS = {
    "customer_service": "You are a friendly, professional customer service agent. Help the customer resolve their issue.",
    "technical_support": "You are a patient technical support agent. Diagnose the problem and give clear steps.",
    "sales": "You are an honest, helpful sales assistant. Understand the customer's needs and recommend fitting options.",
    "tutoring": "You are an encouraging tutor. Explain step by step and check the student's understanding.",
}


class ScenarioError(ValueError):
    """A scenario file cannot be read; the message names the file and, where known, the entry."""


@dataclass
class Scenario:
    id: str
    domain: str
    persona: str
    opening: str
    followups: list[str] = field(default_factory=list)
    expected_behaviours: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    difficulty: str = "medium"
    source: str = ""

    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS.get(self.domain, SYSTEM_PROMPTS["customer_service"])

    def first_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt()}, {"role": "user", "content": self.opening}]


def load_file(path: Path) -> list[Scenario]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        raise ScenarioError(f"{path}: file is empty")
    if not isinstance(raw, list):
        raise ScenarioError(f"{path}: expected a list of scenarios, got {type(raw).__name__}")
    out = []
    for i, entry in enumerate(raw):
        where = f"{path}: entry {i}" + (f" (id {entry.get('id')!r})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            raise ScenarioError(f"{where}: expected a mapping, got {type(entry).__name__}")
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            raise ScenarioError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(entry) - set(REQUIRED))
        if unknown:
            raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}")
        for k in LIST_FIELDS:
            if not isinstance(entry[k], list):
                raise ScenarioError(f"{where}: field {k!r} must be a list, got {type(entry[k]).__name__}")
        values = {k: (list(map(str, entry[k])) if k in LIST_FIELDS else str(entry[k])) for k in REQUIRED}
        out.append(Scenario(**values, source=str(path)))
    return out


def load_dir(directory: str | Path) -> list[Scenario]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ScenarioError(f"{directory}: scenario directory not found")
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        raise ScenarioError(f"{directory}: no *.yaml scenario files")
    return [s for f in files for s in load_file(f)]


def to_frame(scenarios: list[Scenario]) -> pd.DataFrame:
    return pd.DataFrame([asdict(s) for s in scenarios])


def from_frame(df: pd.DataFrame) -> list[Scenario]:
    rows = df.to_dict("records")
    return [Scenario(**{k: (list(v) if k in LIST_FIELDS else v) for k, v in r.items()}) for r in rows]


def split(df: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split stratified by domain: each domain sends ``round(n * eval_fraction)``
    scenarios (at least one) to eval, chosen by a seeded hash of the id, not by file order."""
    def key(sid: str) -> str:
        return hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest()

    eval_ids = set()
    for _, group in df.groupby("domain", sort=True):
        ids = sorted(group["id"], key=key)
        n_eval = max(1, round(len(ids) * eval_fraction)) if len(ids) > 1 else 0
        eval_ids.update(ids[:n_eval])
    is_eval = df["id"].isin(eval_ids)
    return df[~is_eval].reset_index(drop=True), df[is_eval].reset_index(drop=True)
