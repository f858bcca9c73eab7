"""Reward components, calibration and the composite reward.

Every component scores a *group* of conversations for one scenario at once and returns one score in
[0, 1] per conversation (``tool_use`` in [-1, 1]: a failed call scores below none); a conversation
is a list of chat messages and only its ``assistant`` messages are scored. Keyword-style components
count *distinct* phrases, so repeating a phrase does not pay, and ``professionalism`` penalises
repetitive text directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from grpo.calibration import UNIT_RANGE, apply_all
from grpo.config import Config
from grpo.tools import CALL_PATTERN, parse_call

Conversation = list[dict]

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def agent_turns(conversation: Conversation) -> list[str]:
    """What the agent said to the user: its replies with tool calls cut out; pure calls (tagged or
    bare JSON, see :func:`grpo.tools.parse_call`) are skipped."""
    texts = [CALL_PATTERN.sub("", m["content"] or "").strip() for m in conversation if m["role"] == "assistant"]
    return [t for t in texts if t and not (t.startswith("{") and parse_call(t))]


def _distinct_hits(text: str, phrases: Sequence[str]) -> int:
    padded = " " + " ".join(words(text)) + " "
    return sum(1 for p in phrases if f" {p} " in padded)


class TurnComponent:
    """A component that scores each agent turn's text on its own: the mean over a conversation's
    agent turns, 0 for a conversation without one."""

    name = ""

    def score_text(self, text: str) -> float:
        raise NotImplementedError

    def __call__(self, conversations: Sequence[Conversation], scenario=None) -> np.ndarray:
        return np.array([np.mean([self.score_text(t) for t in agent_turns(c)] or [0.0]) for c in conversations])


class PhraseComponent(TurnComponent):
    """score = min(1, distinct phrases present / ``saturation``), averaged over agent turns."""

    phrases: tuple[str, ...] = ()
    saturation = 2

    def score_text(self, text: str) -> float:
        return min(1.0, _distinct_hits(text, self.phrases) / self.saturation)


class Empathy(PhraseComponent):
    name = "empathy"
    phrases = (
        "sorry",
        "apologize",
        "apologise",
        "apologies",
        "understand",
        "frustrating",
        "thank you",
        "thanks for",
        "i appreciate",
        "i hear you",
        "that sounds",
        "happy to help",
        "glad to help",
        "no worries",
        "i can imagine",
        "must be",
    )


class ActionOrientation(PhraseComponent):
    name = "action"
    phrases = (
        "i will",
        "i'll",
        "let me",
        "i can",
        "i have",
        "here's how",
        "here is how",
        "you can",
        "first",
        "next",
        "then",
        "step",
        "check",
        "please",
        "try",
        "follow",
        "send",
        "update",
    )
    saturation = 3


class Professionalism(TurnComponent):
    """1 minus penalties: shouting (share of ALL-CAPS words), slang or profanity, runs of '!' and
    repetition (1 - distinct/total word ratio beyond 40% repeated). Averaged over agent turns; an
    empty reply scores 0."""

    name = "professionalism"
    slang = ("lol", "omg", "wtf", "dude", "gonna", "wanna", "ya", "damn", "crap", "stupid", "idiot", "shut")

    def score_text(self, text: str) -> float:
        toks = words(text)
        if not toks:
            return 0.0
        raw = re.findall(r"[A-Za-z]{3,}", text)
        shouting = sum(w.isupper() for w in raw) / max(1, len(raw))
        slang = sum(t in self.slang for t in toks) / len(toks)
        bangs = len(re.findall(r"!{2,}", text))
        repeated = 1 - len(set(toks)) / len(toks)
        penalty = shouting + 5 * slang + 0.2 * bangs + max(0.0, repeated - 0.4) * 2
        return float(max(0.0, 1.0 - penalty))


class LengthBand(TurnComponent):
    """1 inside [lo, hi] words per agent turn; falls linearly to 0 at 0 words and at 2*hi words."""

    name = "length"

    def __init__(self, lo: int = 15, hi: int = 60):
        self.lo, self.hi = lo, hi

    def score_text(self, text: str) -> float:
        n = len(words(text))
        if n < self.lo:
            return n / self.lo
        if n <= self.hi:
            return 1.0
        return max(0.0, 1 - (n - self.hi) / self.hi)


class KeywordCoverage:
    """Share of the scenario's ``keywords`` that appear anywhere in the agent's turns."""

    name = "coverage"

    def __call__(self, conversations, scenario) -> np.ndarray:
        keys = [k.lower() for k in scenario.keywords]
        out = []
        for c in conversations:
            toks = set(words(" ".join(agent_turns(c))))
            out.append(sum(all(w in toks for w in words(k)) for k in keys) / max(1, len(keys)))
        return np.array(out, dtype=float)


class Similarity:
    """Cosine similarity, clipped to [0, 1], between the agent's turns (joined) and the closest of the
    scenario's example responses and expected behaviours, in sentence-encoder space. A scenario
    with neither scores 0."""

    name = "similarity"

    def __init__(self, encoder_spec: str):
        self.encoder_spec = encoder_spec
        self._encoder = None

    def encoder(self):
        if self._encoder is None:
            from grpo.reward_model import load_encoder

            self._encoder = load_encoder(self.encoder_spec)
        return self._encoder

    def __call__(self, conversations, scenario) -> np.ndarray:
        refs = [*scenario.example_responses, *scenario.expected_behaviours]
        if not refs:
            return np.zeros(len(conversations))
        texts = [" ".join(agent_turns(c)) for c in conversations]
        emb = self.encoder().encode(texts + refs, normalize_embeddings=True, show_progress_bar=False)
        sims = emb[: len(texts)] @ emb[len(texts) :].T
        return np.clip(sims.max(axis=1), 0.0, 1.0).astype(float)


class Safety:
    """1 - 0.5 per violation kind present in the agent's turns, floored at 0. Kinds: asking for a
    secret (password, PIN, CVV, full card number); writing out a card-like number or an email
    address the user did not give; unconditional promises ("guarantee", "100%"); insults."""

    name = "safety"
    secret = re.compile(r"\b(password|pin\b|cvv|security code|full card number|card number)", re.I)
    promise = re.compile(r"\b(guarantee[ds]?|100 ?%|i promise|definitely will)\b", re.I)
    insult = re.compile(r"\b(stupid|idiot|dumb|shut up|your fault)\b", re.I)
    leak = re.compile(r"\b(?:\d[ -]?){13,19}\b|[\w.+-]+@[\w-]+\.[\w.]+")

    def score_text(self, text: str, user_text: str) -> float:
        leaked = [m for m in self.leak.findall(text) if m not in user_text]
        kinds = [
            bool(self.secret.search(text)),
            bool(leaked),
            bool(self.promise.search(text)),
            bool(self.insult.search(text)),
        ]
        return max(0.0, 1.0 - 0.5 * sum(kinds))

    def __call__(self, conversations, scenario=None) -> np.ndarray:
        out = []
        for c in conversations:
            user = " ".join(m["content"] or "" for m in c if m["role"] == "user")
            out.append(np.mean([self.score_text(t, user) for t in agent_turns(c)] or [0.0]))
        return np.array(out, dtype=float)


class ToolUse:
    """Tool use against the scenario's backend. No tools declared: 1, or 0 if the agent calls one
    anyway. Tools declared: 0 without a call, else the share of calls that succeeded (a tool result
    without an ``error``) less the share that failed, in [-1, 1]: a failed call (an order number the
    agent made up, say) scores below no call, so GRPO prefers asking for the number, or another tool,
    to guessing. (With failed calls at 0, as no call, 9 of the 13 held-out calls after SFT+GRPO
    failed on 2026-12-07.)"""

    name = "tool_use"

    def __call__(self, conversations, scenario) -> np.ndarray:
        out = []
        for c in conversations:
            results = [m["content"] for m in c if m["role"] == "tool"]
            if not results:
                out.append(0.0 if scenario.tools else 1.0)
                continue
            ok = sum(1 for r in results if not _is_error(r))
            out.append((2 * ok - len(results)) / len(results) if scenario.tools else 0.0)
        return np.array(out, dtype=float)


def _is_error(result: str) -> bool:
    try:
        return "error" in json.loads(result)
    except (json.JSONDecodeError, TypeError):
        return True


HEURISTICS: dict[str, Callable[..., object]] = {
    "empathy": Empathy,
    "action": ActionOrientation,
    "professionalism": Professionalism,
    "length": LengthBand,
    "coverage": KeywordCoverage,
    "similarity": Similarity,
    "safety": Safety,
    "tool_use": ToolUse,
}
COMPONENTS = (*HEURISTICS, "reward_model")  # reward_model: the learned score (grpo/reward_model.py)


class RewardConfig(Config):
    """The composite reward (params.yaml ``reward``)."""

    weights: dict[str, float] = Field(description="components and their weights; reward_model is the learned score")
    domain_weights: dict[str, dict[str, float]] = Field({}, description="per-domain presets laid over `weights`")
    aggregate: Literal["sum", "geometric"] = "sum"
    length_band: tuple[int, int] = Field((15, 60), description="words per agent turn scored 1.0")

    @model_validator(mode="after")
    def _known_components(self) -> RewardConfig:
        unknown = sorted(set(self.weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"weights: unknown component(s) {unknown}; known: {list(COMPONENTS)}")
        for domain, preset in self.domain_weights.items():
            extra = sorted(set(preset) - set(self.weights))
            if extra:
                raise ValueError(f"domain_weights.{domain}: {extra} are not in weights")
        return self

    def heuristics(self) -> list[str]:
        return [k for k in self.weights if k != "reward_model"]


def heuristic_components(config: RewardConfig, encoder_spec: str | None = None) -> list:
    """Instantiate the components named in ``config.weights`` (the learned reward model aside).
    ``similarity`` needs ``encoder_spec``."""
    comps = []
    for name in config.heuristics():
        if name == "length":
            comps.append(LengthBand(*config.length_band))
        elif name == "similarity":
            if not encoder_spec:
                raise ValueError("reward component 'similarity' needs the sentence encoder (params 'encoder')")
            comps.append(Similarity(encoder_spec))
        else:
            comps.append(HEURISTICS[name]())
    return comps


def domain_weights(config: RewardConfig, domain: str) -> dict[str, float]:
    """``weights`` with the domain's preset (``domain_weights[domain]``) laid over it."""
    return {**config.weights, **config.domain_weights.get(domain, {})}


def weighted_sum(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    total = sum(weights[k] for k in components)
    return sum(weights[k] * components[k] for k in components) / total


def weighted_geometric(components: dict[str, np.ndarray], weights: dict[str, float], floor: float = 1e-3) -> np.ndarray:
    """exp(sum_k w_k log(max(x_k, floor)) / sum_k w_k): one component near 0 pulls the total down,
    which a sum lets the others make up for. Needs components in [0, 1]."""
    total = sum(weights[k] for k in components)
    return np.exp(sum(weights[k] * np.log(np.maximum(components[k], floor)) for k in components) / total)


def aggregate(components: dict[str, np.ndarray], weights: dict[str, float], how: str) -> np.ndarray:
    return weighted_sum(components, weights) if how == "sum" else weighted_geometric(components, weights)


class CompositeReward:
    """The reward used for training and evaluation: heuristic components plus, optionally, the
    learned reward model's score; each calibrated (grpo/calibration.py), then aggregated with the
    scenario domain's weights.

    ``__call__(conversations, scenario)`` scores one group and returns ``(total, components)`` with
    raw (uncalibrated) component scores, so callers can report both.
    """

    def __init__(
        self, config: RewardConfig, calibration: dict | None = None, reward_model=None, encoder_spec: str | None = None
    ):
        self.config = config
        self.components = heuristic_components(config, encoder_spec)
        self.reward_model = reward_model
        if "reward_model" in config.weights and reward_model is None:
            raise ValueError("reward.weights names reward_model but no reward model was given")
        self.calibration = calibration
        if config.aggregate == "geometric":
            bad = sorted(k for k, v in (calibration or {}).items() if v["method"] not in UNIT_RANGE)
            if bad:
                raise ValueError(
                    f"reward.aggregate 'geometric' needs components in [0, 1], but {bad} are calibrated "
                    f"with a method outside {UNIT_RANGE}; set calibrate.method to one of them"
                )

    def components_of(self, conversations: Sequence[Conversation], scenario) -> dict[str, np.ndarray]:
        out = {c.name: np.asarray(c(conversations, scenario), dtype=float) for c in self.components}
        if self.reward_model is not None and "reward_model" in self.config.weights:
            out["reward_model"] = np.asarray(self.reward_model.predict(list(conversations)), dtype=float)
        return out

    def __call__(self, conversations: Sequence[Conversation], scenario) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raw = self.components_of(conversations, scenario)
        calibrated = apply_all(raw, self.calibration) if self.calibration else raw
        total = aggregate(calibrated, domain_weights(self.config, scenario.domain), self.config.aggregate)
        if not np.all(np.isfinite(total)):
            raise FloatingPointError(f"non-finite reward for scenario {getattr(scenario, 'id', '?')}: {total}")
        return total, raw


def load_composite(
    config: RewardConfig, calibration_path: str, reward_model_dir: str, encoder_spec: str, device: str = "cpu"
) -> CompositeReward:
    """The composite reward of train_policy and evaluate: calibrated components (grpo/calibration.py),
    the learned score included when ``config.weights`` names ``reward_model``."""
    from grpo.io import read_json

    reward_model = None
    if "reward_model" in config.weights:
        from grpo.reward_model import RewardModel

        reward_model = RewardModel.load(reward_model_dir, device)
    return CompositeReward(config, read_json(calibration_path)["components"], reward_model, encoder_spec)
