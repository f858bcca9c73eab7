"""Continuous batching for the chat server (grpo/serving.py): requests join a running batch between
decoding steps and leave it as soon as they finish, instead of waiting for a whole batch to end.

The batch keeps one transformers ``DynamicCache`` for its rows, left-padded to a common length
with an attention mask over the real columns, as ``generate`` keeps it. Joining rows are
prefilled together and their cache is concatenated to the running one (the shorter side padded on
the left); a finished row's cache row is dropped, and columns that no row uses any more are cut
off the left. Every row samples with its own temperature, top_p and seeded stream
(grpo/rollout.py ``RowSampler``) and, where it has one, its own JSON-schema constraint, so a
seeded reply does not depend on the rows beside it.

Why not transformers' own continuous batching (``generation/continuous_batching``): it samples
with per-request temperature and top_p but not with per-request seeds or logits processors (the
server's seeded replies and structured outputs), and it pages its cache for GPU kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from grpo.models import prefill
from grpo.rollout import RowSampler, keep_only


@dataclass
class Row:
    """One request in the batch: its prompt, its sampling settings and the tokens sampled so far."""

    prompt: list[int]
    max_tokens: int
    seed: int
    temperature: float  # 0: greedy
    top_p: float
    allowed: Callable[[list[int]], list[int] | None] | None = None  # its constraint: allowed after ``tokens``
    tag: Any = None  # the caller's handle on the request
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # the caller gave up on it (its client went away)
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)


class ContinuousBatch:
    """The running rows of one model. :meth:`admit` prefills new rows and samples their first
    token, :meth:`step` samples one more token for every row, :meth:`pop_finished` takes out the
    rows that sampled eos, reached their ``max_tokens`` or were stopped."""

    def __init__(self, model, eos: int):
        self.model, self.eos = model, eos
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cached columns): 1 on each row's real tokens
        self.last: torch.Tensor | None = None  # each row's last sampled token, not yet in the cache
        # Joining concatenates plain cache layers; a model with other layers (sliding windows)
        # takes new rows only when the batch is empty, as a static batcher would.
        self.joinable = True

    def accepts(self) -> bool:
        return not self.rows or self.joinable

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        out, mask = prefill(self.model, [r.prompt for r in rows], self.device)
        first = self.sample(rows, out.logits[:, -1])
        cache = out.past_key_values
        self.joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        if self.rows:
            gap = mask.shape[1] - self.mask.shape[1]
            self.mask = torch.cat([F.pad(self.mask, (max(gap, 0), 0)), F.pad(mask, (max(-gap, 0), 0))])
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([left_pad(old.keys, gap), left_pad(new.keys, -gap)])
                old.values = torch.cat([left_pad(old.values, gap), left_pad(new.values, -gap)])
            self.last = torch.cat([self.last, first])
        else:
            self.cache, self.mask, self.last = cache, mask, first
        self.rows += rows

    @torch.no_grad()
    def step(self) -> None:
        positions = self.mask.sum(-1, keepdim=True)  # each row's count of real tokens so far
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.last = self.sample(self.rows, out.logits[:, -1])

    def sample(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token, appended to its ``tokens``: its constraint's tokens only, then
        drawn with its own settings and stream (greedy at temperature 0)."""
        scores = logits.float()
        for i, r in enumerate(rows):
            allowed = r.allowed(r.tokens) if r.allowed is not None else None
            if allowed is not None:
                keep_only(scores[i], allowed)
        sampler = RowSampler([r.generator for r in rows], [r.temperature for r in rows], [r.top_p for r in rows])
        tokens = sampler(None, scores).argmax(-1)
        for r, t in zip(rows, tokens.tolist()):
            r.tokens.append(t)
        return tokens

    def finished(self, row: Row) -> bool:
        return row.stopped or len(row.tokens) >= row.max_tokens or (bool(row.tokens) and row.tokens[-1] == self.eos)

    def pop_finished(self) -> list[Row]:
        done = [r for r in self.rows if self.finished(r)]
        if not done:
            return []
        keep = [i for i, r in enumerate(self.rows) if not self.finished(r)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return done
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        start = int(self.mask.any(0).long().argmax())  # the first column a row still uses
        if start and self.joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]
        return done


def left_pad(states: torch.Tensor, columns: int) -> torch.Tensor:
    """``states`` (batch, heads, columns, dim) with ``columns`` zero columns in front (none if <= 0)."""
    return F.pad(states, (0, 0, max(columns, 0), 0))
