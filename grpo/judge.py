"""A RULER-style LLM judge: one request scores a whole group of conversations for one scenario,
relative to each other, against a rubric, over any OpenAI-compatible endpoint.

The prompt shows the shared prefix (the agent's instructions and the user's opening) once, then
each conversation's continuation under an id, and asks for JSON::

    {"scores": [{"id": "1", "score": 0.7, "explanation": "..."}, ...]}

With ``structured`` the request carries the answer's JSON schema as ``response_format`` (structured
outputs): the scores keyed by id, each a tenth from 0 to 1. The project's own server decodes under
that schema (grpo/structured.py), so its answers cannot be malformed; it is on by default there, and
off for other endpoints, where it is only as good as the endpoint's support for it.

An answer with bad JSON, the wrong count or the wrong ids gets one repair request (the bad answer
and what was wrong with it); if that fails too, the group gets the heuristic fallback and is marked
``label_source = "fallback"``. HTTP errors and timeouts are retried by the ``openai`` SDK
(exponential backoff with jitter, ``max_retries``); when they are exhausted, or a 200's body is not
a chat completion, the group falls back too. Requests run ``max_concurrency`` at a time.

Judgements are cached on disk, one JSON file per group, keyed by the judge's identity, rubric and
prompt and by the conversations, and written atomically: a rerun after a crash asks only for the
groups that were not finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from tqdm.auto import tqdm

from grpo.config import Config
from grpo.io import read_json, write_json

log = logging.getLogger(__name__)
PROMPT_VERSION = 1

RUBRICS = {
    "default": "A good agent reply is helpful, correct, specific to the user's request, polite, concise, "
    "and moves the conversation towards resolving the user's goal.",
    "customer_service": "Reward replies that acknowledge the problem, take ownership, give a concrete next step "
    "(check, refund, replace, escalate) and set expectations on timing. Penalise vague or evasive replies.",
    "technical_support": "Reward replies that diagnose before prescribing, give clear numbered steps the user can follow, "
    "and check whether the fix worked. Penalise guesses presented as facts.",
    "sales": "Reward replies that ask about needs, recommend fitting options honestly with prices or trade-offs, "
    "and respect a user who is not ready to buy. Penalise pushiness and invented features.",
    "tutoring": "Reward replies that explain step by step, check understanding and let the student do part of the work. "
    "Penalise just giving answers to homework and factual mistakes.",
}


class JudgeFormatError(ValueError):
    pass


class JudgeResponseError(RuntimeError):
    """The endpoint answered 200 with a body that is not a chat completion (cut off, not JSON, no choices)."""


class JudgeConfig(Config):
    """The judge's endpoint and requests."""

    model: str = Field(description="model name sent in requests")
    base_url: str | None = Field(None, description='an OpenAI-compatible endpoint (".../v1")')
    api_key_env: str = Field("JUDGE_API_KEY", description="the key is read from this variable and never logged")
    identity: str = Field("", description='what the cache key names as "the judge"; defaults to model@base_url')
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0, description="HTTP retries (backoff with jitter) by the openai SDK")
    max_concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    structured: bool | None = Field(
        None,
        description="send the answer's JSON schema as response_format, so that a server which enforces it "
        "cannot answer malformed JSON; null: only to the project's own server",
    )
    rubrics: dict[str, str] = Field(default_factory=lambda: dict(RUBRICS))


@dataclass
class Judgement:
    scores: list[float] | None  # None: the judge failed and the caller falls back
    explanations: list[str]
    source: str  # "judge" or "fallback"
    repaired: bool = False
    error: str = ""


def render_turns(messages: list[dict]) -> str:
    return "\n".join(f"{m['role'].upper()}: {m.get('content') or ''}" for m in messages)


def build_prompt(rubric: str, conversations: list[list[dict]]) -> list[dict]:
    """Shared prefix once (the messages every conversation starts with), then each continuation."""
    n_shared = 0
    while all(len(c) > n_shared and c[n_shared] == conversations[0][n_shared] for c in conversations):
        n_shared += 1
    ids = [str(i + 1) for i in range(len(conversations))]
    body = [f"Shared beginning of every conversation:\n{render_turns(conversations[0][:n_shared])}"]
    body += [f"Conversation {i}:\n{render_turns(c[n_shared:])}" for i, c in zip(ids, conversations)]
    system = (
        f"You are a strict judge of AI agent conversations. Rubric: {rubric}\n"
        f"Score each of the {len(ids)} conversations from 0 (worst) to 1 (best), comparing them with each other. "
        'Answer with JSON only, in this form: {"scores": [{"id": "1", "score": <number from 0 to 1>, "explanation": "<one short sentence>"}]} '
        f"with exactly one entry for each id: {', '.join(ids)}."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(body) + "\n\nYour JSON:"}]


SCORES = [round(i / 10, 1) for i in range(11)]  # the values a structured answer may give


def answer_schema(n: int) -> dict:
    """The JSON schema of an answer for ``n`` conversations, as structured outputs: the scores keyed
    by id (every id), each a tenth from 0 to 1 with a short explanation."""
    entry = {
        "type": "object",
        "properties": {"score": {"enum": SCORES}, "explanation": {"type": "string", "maxLength": 60}},
        "required": ["score", "explanation"],
        "additionalProperties": False,
    }
    ids = [str(i + 1) for i in range(n)]
    scores = {"type": "object", "properties": dict.fromkeys(ids, entry), "required": ids, "additionalProperties": False}
    return {"type": "object", "properties": {"scores": scores}, "required": ["scores"], "additionalProperties": False}


def parse_answer(text: str, n: int) -> tuple[list[float], list[str]]:
    """Scores and explanations in id order, or :class:`JudgeFormatError` saying what is wrong."""
    match = re.search(r"[\[{].*[\]}]", text or "", re.S)
    if not match:
        raise JudgeFormatError("no JSON object in the answer")
    try:
        data = json.loads(match.group())
    except json.JSONDecodeError as e:
        raise JudgeFormatError(f"invalid JSON: {e.msg}") from None
    items = data.get("scores") if isinstance(data, dict) else data
    if isinstance(items, dict):  # the structured form: entries keyed by id
        items = [{"id": k, **v} if isinstance(v, dict) else {"id": k, "score": v} for k, v in items.items()]
    if not isinstance(items, list):
        raise JudgeFormatError('expected a "scores" list')
    if len(items) != n:
        raise JudgeFormatError(f"expected {n} scores, got {len(items)}")
    by_id = {}
    for item in items:
        if not isinstance(item, dict) or "id" not in item or "score" not in item:
            raise JudgeFormatError('every entry needs "id" and "score"')
        score = item["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            raise JudgeFormatError(f"score {score!r} for id {item['id']!r} is not a number from 0 to 1")
        by_id[str(item["id"])] = (float(score), str(item.get("explanation", ""))[:500])
    expected = [str(i + 1) for i in range(n)]
    if sorted(by_id) != sorted(expected):
        raise JudgeFormatError(f"ids {sorted(by_id)} do not match {expected}")
    return [by_id[i][0] for i in expected], [by_id[i][1] for i in expected]


class Judge:
    def __init__(self, config: JudgeConfig, client=None):
        import openai

        if not config.base_url and client is None:
            raise ValueError("the judge needs a base_url (an OpenAI-compatible endpoint)")
        self.config = config
        self.client = client or openai.OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env) or "unused",
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    def rubric(self, domain: str) -> str:
        return self.config.rubrics.get(domain, self.config.rubrics["default"])

    def cache_key(self, domain: str, conversations: list[list[dict]]) -> str:
        c = self.config
        ident = {
            "judge": c.identity or f"{c.model}@{c.base_url}",
            "rubric": self.rubric(domain),
            "prompt": PROMPT_VERSION,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            "structured": bool(c.structured),
            "conversations": conversations,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def ask(self, messages: list[dict], n: int) -> str:
        structured = {}
        if self.config.structured:
            schema = {"name": "judge_scores", "schema": answer_schema(n), "strict": True}
            structured["response_format"] = {"type": "json_schema", "json_schema": schema}
        try:
            r = self.client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                max_tokens=self.config.max_tokens,
                temperature=self.config.temperature,
                **structured,
            )
        except json.JSONDecodeError as e:  # the SDK parses the body without wrapping this error
            raise JudgeResponseError(f"the response body is not JSON: {e}") from None
        try:
            return r.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError) as e:
            raise JudgeResponseError(f"the response is not a chat completion: {e}") from None

    def judge_group(self, domain: str, conversations: list[list[dict]]) -> Judgement:
        import openai

        messages = build_prompt(self.rubric(domain), conversations)
        try:
            answer = self.ask(messages, len(conversations))
            try:
                return Judgement(*parse_answer(answer, len(conversations)), source="judge")
            except JudgeFormatError as first:
                repair = messages + [
                    {"role": "assistant", "content": answer},
                    {
                        "role": "user",
                        "content": f"That answer was not usable: {first}. Reply with the JSON "
                        f"only, one entry for each id 1 to {len(conversations)}.",
                    },
                ]
                try:
                    return Judgement(
                        *parse_answer(self.ask(repair, len(conversations)), len(conversations)),
                        source="judge",
                        repaired=True,
                    )
                except JudgeFormatError as second:
                    return Judgement(None, [], "fallback", repaired=True, error=f"{first}; after repair: {second}")
        except (openai.OpenAIError, JudgeResponseError) as e:  # this group falls back, the others go on
            return Judgement(None, [], "fallback", error=f"{type(e).__name__}: {e}")

    def judge_groups(self, groups: list[tuple[str, list[list[dict]]]], cache_dir: str | Path) -> list[Judgement]:
        """Judge ``(domain, conversations)`` groups, answering from and filling the on-disk cache."""
        cache = Path(cache_dir)
        keys = [self.cache_key(d, convs) for d, convs in groups]
        out: list[Judgement | None] = [None] * len(groups)
        todo = []
        for i, k in enumerate(keys):
            if (cache / f"{k}.json").exists():
                out[i] = Judgement(**read_json(cache / f"{k}.json"))
            else:
                todo.append(i)
        if len(todo) < len(groups):
            log.info("judge: %d of %d groups answered from the cache %s", len(groups) - len(todo), len(groups), cache)

        def work(i: int) -> tuple[int, Judgement]:
            j = self.judge_group(*groups[i])
            if j.source == "judge" or j.repaired:  # not a transport failure, which a rerun should retry
                write_json(cache / f"{keys[i]}.json", j.__dict__)
            return i, j

        with ThreadPoolExecutor(self.config.max_concurrency) as pool:
            futures = [pool.submit(work, i) for i in todo]
            for f in tqdm(as_completed(futures), total=len(todo), desc="judge", disable=not todo):
                i, j = f.result()
                out[i] = j
        return out


@contextlib.contextmanager
def endpoint(config: JudgeConfig, model=None, tokenizer=None, local_name: str = "") -> Iterator[JudgeConfig]:
    """The config to judge with: ``config`` as it is when it names an endpoint; otherwise ``model``
    served on loopback by the project's own server (grpo/serving.py) for as long as the block runs,
    with ``local:<local_name>`` as the judge's identity in the cache."""
    if config.base_url:
        yield config
        return
    from grpo.config import Limits
    from grpo.serving import create_app, serve_in_thread

    limits = Limits(max_tokens=config.max_tokens, max_prompt_tokens=8192, max_concurrent=64, max_batch=16)
    app = create_app(lambda: (model, tokenizer, config.model), limits)
    with serve_in_thread(app) as url:
        log.info("judge: %s served on %s", local_name, url)
        structured = True if config.structured is None else config.structured
        yield config.model_copy(
            update={"base_url": f"{url}/v1", "identity": f"local:{local_name}", "structured": structured}
        )


def judge_groups(
    config: JudgeConfig,
    groups: list[tuple[str, list[list[dict]]]],
    cache_dir: str | Path,
    model=None,
    tokenizer=None,
    local_name: str = "",
) -> list[Judgement]:
    """Judge ``(domain, conversations)`` groups at the configured endpoint, or with ``model`` served
    locally when ``config.base_url`` is None (see :func:`endpoint`)."""
    with endpoint(config, model, tokenizer, local_name) as resolved:
        return Judge(resolved).judge_groups(groups, cache_dir)
