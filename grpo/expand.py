"""Deterministic, seeded expansion of hand-written seed scenarios, and near-duplicate removal.

Three kinds of variant, each keeping the seed's ``family`` so a seed and its variants never straddle
the train/eval split:

- tone: the same request written by a different kind of user (polite, impatient, confused ...):
  the persona gains a sentence and the opening and follow-ups are reworded around the original;
- order state: for seeds whose backend holds orders, the same conversation against another order
  state (shipped, lost ...), so tool results and the right answer change;
- product: for seeds whose ordered item is named in the conversation, the same complaint about
  another product, in the text and in the backend;
- multi-issue: two seeds of one domain folded into one conversation (:func:`multi_issue`). Their
  family is ``"a+b"``; they are built after the split from seeds on the same side only.

The same seed, params and seed files give the same scenarios, in the same order, on every machine:
choices come from ``random.Random`` seeded with the global seed and the seed scenario's id.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from collections.abc import Callable

import numpy as np

from grpo.scenarios import Scenario

# name: (persona sentence, opening template, follow-up template). {o} is the original text,
# {first} its first sentence in lower case without the final punctuation.
TONES = {
    "polite": (
        "They are unfailingly polite.",
        "Hello, I hope you are well. {o} Thank you for your help.",
        "{o} Thanks.",
    ),
    "impatient": ("They are short on time and impatient.", "{o} I need this sorted quickly.", "{o} Please hurry."),
    "confused": (
        "They are not confident with jargon and get confused easily.",
        "Sorry, I'm a bit lost here. {o} I don't really know what to do.",
        "Sorry, I don't quite follow. {o}",
    ),
    "frustrated": (
        "They have asked for help before and are frustrated.",
        "I already tried to get help with this once. {o} This is really frustrating.",
        "{o} Honestly, this should be simple.",
    ),
    "terse": ("They write very short messages in lower case.", "{first}", "{first}"),
    "non_native": ("English is not their first language.", "Hello. {o} Sorry for my English.", "{o}"),
}
# A situational detail added to a tone variant's opening, so it is a new request, not a rewording.
DETAILS = [
    "I'm travelling next week, so timing matters.",
    "This is for my elderly mother, who asked me to help.",
    "I'm writing from my phone during my lunch break.",
    "It's for work, and my manager is asking about it.",
    "I tried searching your help pages first but found nothing.",
    "I've been a customer for about six years.",
    "Money is tight this month.",
    "My partner thinks I did something wrong.",
    "I have a deadline on Friday.",
    "I'm not very good with computers.",
]
# Products that fit the same complaint as the seed's item (a cracked lamp base -> a cracked vase).
PRODUCTS = {
    "lamp": ["vase", "mirror", "ceramic bowl", "glass jug"],
    "jacket": ["raincoat", "pair of jeans", "wool jumper", "dress"],
    "blender": ["kettle", "toaster", "coffee grinder", "food processor"],
}
ORDER_STATES = {  # status -> refundable
    "processing": True,
    "shipped": False,
    "delivered": True,
    "lost in transit": True,
    "returned to sender": True,
}


def _first(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".!?").lower()


def tone_variant(seed: Scenario, tone: str, detail: str) -> Scenario:
    persona_add, opening_t, followup_t = TONES[tone]
    return seed.model_copy(
        deep=True,
        update={
            "id": f"{seed.id}--{tone}",
            "persona": f"{seed.persona} {persona_add}",
            "opening": f"{opening_t.format(o=seed.opening, first=_first(seed.opening))} {detail}",
            "followups": [followup_t.format(o=f, first=_first(f)) for f in seed.followups],
            "tags": [*seed.tags, f"tone:{tone}"],
            "source": f"{seed.source}#tone:{tone}",
        },
    )


def order_state_variant(seed: Scenario, status: str) -> Scenario:
    backend = copy.deepcopy(seed.backend)
    for order in backend["orders"].values():
        order.update(status=status, refundable=ORDER_STATES[status])
    slug = status.replace(" ", "-")
    return seed.model_copy(
        deep=True,
        update={
            "id": f"{seed.id}--{slug}",
            "backend": backend,
            "success_criteria": [*seed.success_criteria, f"the agent reports the order as {status}"],
            "tags": [*seed.tags, f"order-state:{slug}"],
            "source": f"{seed.source}#order-state:{slug}",
        },
    )


def product_noun(seed: Scenario) -> str | None:
    """The last word of the first ordered item ("lamp" of "table lamp") if the user's turns name it
    and :data:`PRODUCTS` has alternatives for it."""
    items = [i for o in seed.backend.get("orders", {}).values() for i in o.get("items", [])]
    noun = items[0].split()[-1] if items else None
    if noun not in PRODUCTS:
        return None
    text = " ".join([seed.opening, *seed.followups]).lower()
    return noun if noun and re.search(rf"\b{re.escape(noun)}\b", text) else None


def product_variant(seed: Scenario, product: str) -> Scenario:
    noun = product_noun(seed)
    swap = lambda t: re.sub(rf"\b{re.escape(noun)}\b", product, t, flags=re.IGNORECASE)
    backend = copy.deepcopy(seed.backend)
    for order in backend["orders"].values():
        order["items"] = [product] + order["items"][1:]
    slug = product.replace(" ", "-")
    return seed.model_copy(
        deep=True,
        update={
            "id": f"{seed.id}--{slug}",
            "persona": swap(seed.persona),
            "goal": swap(seed.goal),
            "opening": swap(seed.opening),
            "followups": [swap(f) for f in seed.followups],
            "example_responses": [swap(r) for r in seed.example_responses],
            "backend": backend,
            "tags": [*seed.tags, f"product:{slug}"],
            "source": f"{seed.source}#product:{slug}",
        },
    )


def expand(seeds: list[Scenario], seed: int, tones: int, order_states: int, products: int) -> list[Scenario]:
    """Seeds followed by their variants: ``tones`` tone variants per seed, ``order_states``
    order-state variants per seed with orders, ``products`` product variants per seed that names
    its ordered item."""
    out = list(seeds)
    for s in seeds:
        rng = random.Random(f"{seed}:{s.id}")
        picked = rng.sample(sorted(TONES), min(tones, len(TONES)))
        out += [tone_variant(s, t, d) for t, d in zip(picked, rng.sample(DETAILS, len(picked)))]
        if "orders" in s.backend:
            current = {o.get("status") for o in s.backend["orders"].values()}
            states = [x for x in sorted(ORDER_STATES) if x not in current]
            out += [order_state_variant(s, x) for x in rng.sample(states, min(order_states, len(states)))]
        if noun := product_noun(s):
            out += [product_variant(s, x) for x in rng.sample(PRODUCTS[noun], min(products, len(PRODUCTS[noun])))]
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if k not in out:
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        elif isinstance(v, list):
            out[k] = out[k] + [x for x in v if x not in out[k]]
    return out


def _union(a: list, b: list) -> list:
    return a + [x for x in b if x not in a]


def multi_issue(seeds: list[Scenario], seed: int, per_domain: int) -> list[Scenario]:
    """Up to ``per_domain`` two-issue conversations per domain: pairs of seeds drawn by a seeded
    shuffle of all pairs. Follow-ups alternate between the two issues."""
    out = []
    for domain in sorted({s.domain for s in seeds}):
        pairs = list(itertools.combinations(sorted((s for s in seeds if s.domain == domain), key=lambda s: s.id), 2))
        random.Random(f"{seed}:multi:{domain}").shuffle(pairs)
        for a, b in pairs[:per_domain]:
            follow = [x for pair in zip(a.followups, b.followups) for x in pair]
            opening_b = b.opening[0].lower() + b.opening[1:] if not b.opening[:2].isupper() else b.opening
            out.append(
                Scenario(
                    id=f"{a.id}+{b.id}",
                    domain=domain,
                    family=f"{a.family}+{b.family}",
                    persona=f"{a.persona} They also have a second, unrelated problem.",
                    goal=f"{a.goal} Also: {b.goal}",
                    opening=f"{a.opening} Also, {opening_b}",
                    followups=follow,
                    expected_behaviours=_union(a.expected_behaviours, b.expected_behaviours) + ["address both issues"],
                    keywords=_union(a.keywords, b.keywords),
                    tools=_union(a.tools, b.tools),
                    backend=_merge(a.backend, b.backend),
                    success_criteria=_union(a.success_criteria, b.success_criteria),
                    difficulty="hard",
                    tags=["multi-issue"],
                    source=f"{a.source}#multi-issue",
                )
            )
    return out


def dialogue_text(s: Scenario) -> str:
    return " ".join([s.opening, *s.followups])


def near_duplicates(
    scenarios: list[Scenario], embed: Callable[[list[str]], np.ndarray], threshold: float
) -> tuple[list[Scenario], list[dict]]:
    """Drop scenarios whose user turns embed within cosine ``threshold`` of an earlier kept one with
    the same tools and backend data (those differ in what the right answer is, so they are not
    duplicates). Returns (kept, [{dropped, kept, similarity}]). Earlier scenarios win, so seeds,
    which come first, are kept over their variants."""
    if not scenarios:
        return [], []
    vecs = embed([dialogue_text(s) for s in scenarios])
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
    kept_idx: dict[str, list[int]] = {}
    kept, dropped = [], []
    for i, s in enumerate(scenarios):
        key = json.dumps([s.tools, s.backend], sort_keys=True)
        others = kept_idx.setdefault(key, [])
        if others:
            sims = vecs[others] @ vecs[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                dropped.append(
                    {"dropped": s.id, "kept": scenarios[others[j]].id, "similarity": round(float(sims[j]), 4)}
                )
                continue
        others.append(i)
        kept.append(s)
    return kept, dropped
