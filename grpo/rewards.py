"""Reward components, calibration and the composite reward.

Every component scores a *group* of conversations for one scenario at once and returns one score in
[0, 1] per conversation; a conversation is a list of chat messages and only its ``assistant``
messages are scored. Keyword-style components count *distinct* phrases, so repeating a phrase does
not pay, and ``professionalism`` penalises repetitive text directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

Conversation = list[dict]

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def agent_turns(conversation: Conversation) -> list[str]:
    return [m["content"] for m in conversation if m["role"] == "assistant"]


def _distinct_hits(text: str, phrases: Sequence[str]) -> int:
    padded = " " + " ".join(words(text)) + " "
    return sum(1 for p in phrases if f" {p} " in padded)


class PhraseComponent:
    """score = min(1, distinct phrases present / ``saturation``), averaged over agent turns."""

    name = ""
    phrases: tuple[str, ...] = ()
    saturation = 2

    def score_text(self, text: str) -> float:
        return min(1.0, _distinct_hits(text, self.phrases) / self.saturation)

    def __call__(self, conversations: Sequence[Conversation], scenario=None) -> np.ndarray:
        return np.array([np.mean([self.score_text(t) for t in agent_turns(c)] or [0.0]) for c in conversations])


class Empathy(PhraseComponent):
    name = "empathy"
    phrases = ("sorry", "apologize", "apologise", "apologies", "understand", "frustrating", "thank you",
               "thanks for", "i appreciate", "i hear you", "that sounds", "happy to help", "glad to help",
               "no worries", "i can imagine", "must be")


class ActionOrientation(PhraseComponent):
    name = "action"
    phrases = ("i will", "i'll", "let me", "i can", "i have", "here's how", "here is how", "you can",
               "first", "next", "then", "step", "check", "please", "try", "follow", "send", "update")
    saturation = 3


class Professionalism:
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

    def __call__(self, conversations, scenario=None) -> np.ndarray:
        return np.array([np.mean([self.score_text(t) for t in agent_turns(c)] or [0.0]) for c in conversations])


class LengthBand:
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

    def __call__(self, conversations, scenario=None) -> np.ndarray:
        return np.array([np.mean([self.score_text(t) for t in agent_turns(c)] or [0.0]) for c in conversations])


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


HEURISTICS: dict[str, Callable[..., object]] = {
    "empathy": Empathy, "action": ActionOrientation, "professionalism": Professionalism,
    "length": LengthBand, "coverage": KeywordCoverage,
}


def heuristic_components(params: dict) -> list:
    """Instantiate the heuristic components named in ``params['weights']`` (reward model aside)."""
    comps = []
    for name in params["weights"]:
        if name == "reward_model":
            continue
        if name not in HEURISTICS:
            raise KeyError(f"reward.weights: unknown component {name!r}; known: {sorted(HEURISTICS)} + reward_model")
        comps.append(LengthBand(*params["length_band"]) if name == "length" else HEURISTICS[name]())
    return comps


def weighted_sum(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    total = sum(weights[k] for k in components)
    return sum(weights[k] * components[k] for k in components) / total


def fit_zscore(components: dict[str, Sequence[float]], min_std: float) -> dict:
    """Per-component z-score normalisers. ``min_std`` keeps a near-constant component from being
    blown up into noise."""
    return {k: {"mean": float(np.mean(v)), "std": float(max(np.std(v), min_std))} for k, v in components.items()}


def apply_calibration(components: dict[str, np.ndarray], calibration: dict) -> dict[str, np.ndarray]:
    missing = set(components) - set(calibration)
    if missing:
        raise KeyError(f"calibration has no entry for component(s) {sorted(missing)}; rerun calibrate")
    return {k: (v - calibration[k]["mean"]) / calibration[k]["std"] for k, v in components.items()}


class CompositeReward:
    """The reward used for training and evaluation: heuristic components plus, optionally, the
    learned reward model's score; each calibrated, then weighted.

    ``__call__(conversations, scenario)`` scores one group and returns ``(total, components)`` with
    raw (uncalibrated) component scores, so callers can report both.
    """

    def __init__(self, params: dict, calibration: dict | None = None, reward_model=None):
        self.weights = dict(params["weights"])
        self.components = heuristic_components(params)
        self.reward_model = reward_model
        if "reward_model" in self.weights and reward_model is None:
            raise ValueError("reward.weights names reward_model but no reward model was given")
        self.calibration = calibration

    def components_of(self, conversations: Sequence[Conversation], scenario) -> dict[str, np.ndarray]:
        out = {c.name: np.asarray(c(conversations, scenario), dtype=float) for c in self.components}
        if self.reward_model is not None and "reward_model" in self.weights:
            out["reward_model"] = np.asarray(self.reward_model.predict(list(conversations)), dtype=float)
        return out

    def __call__(self, conversations: Sequence[Conversation], scenario) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raw = self.components_of(conversations, scenario)
        calibrated = apply_calibration(raw, self.calibration) if self.calibration else raw
        total = weighted_sum(calibrated, self.weights)
        if not np.all(np.isfinite(total)):
            raise FloatingPointError(f"non-finite reward for scenario {getattr(scenario, 'id', '?')}: {total}")
        return total, raw
