"""Multi-turn rollouts: the policy talks, calls tools, the user answers; token ids are kept exactly.

A :class:`Trajectory` holds the token ids the model saw and sampled, in order, and an
``assistant_mask`` that is 1 exactly on the tokens the policy sampled (its replies, including the
end-of-turn token it chose). System, user, tool and template tokens are context and have mask 0.

Tools are declared by the model's chat template where it supports them (the template mentions
``tools``), and as text in the system prompt otherwise (SmolLM2). Each agent turn is one
generation. A reply holding a tool call (grpo/tools.py: ``parse_call``) is
executed against the episode's own copy of the scenario backend and answered with a ``tool``
message, and the agent speaks again; a malformed or failing call gets an error message and is
counted, and the episode goes on. Otherwise the user answers: the scenario's scripted follow-ups
(``user: scripted``) or an LLM playing the scenario's persona and goal (``user: llm``), which ends
the episode by writing DONE. Episodes end after ``max_turns`` agent turns.

All active conversations of all groups are generated in one batched ``generate`` call per agent
turn, and the LLM user's replies in one more; nothing loops over trajectories one by one. Label
and evaluate split their rollouts into :class:`RolloutJob` s, which can run on other processes.

Given ``seeds`` (one per trajectory), each row samples from its own random stream
(:class:`RowSampler`), so an episode depends on its seed alone, not on the rows that share its
batch: the trainer's episodes are then the same in one process and split over several.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from grpo.config import RolloutConfig
from grpo.models import prompt_cache
from grpo.scenarios import Scenario
from grpo.structured import call_constraint
from grpo.tools import call_tool, given_ids, grounded_schemas, parse_call, schemas, template_declares_tools

log = logging.getLogger(__name__)

USER_SIMULATOR = (
    "You are role-playing a user who is talking to a {domain} agent. You are: {persona} "
    "Your goal: {goal} Write only your next message to the agent, one or two short sentences, in "
    "character. If your goal has been met, write only the word DONE."
)


@dataclass
class Trajectory:
    scenario_id: str
    group: int
    messages: list[dict]
    input_ids: list[int]
    assistant_mask: list[int]
    turns: int = 0
    truncated_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # calls that failed, of them
    tool_malformed: int = 0  # calls that were not a well-formed call, of those
    sampled_logps: list[float] | None = None  # the sampler's log-prob of each sampled token, 0 elsewhere (logprobs)

    def agent_runs(self) -> list[list[int]]:
        """The token ids of each agent turn: the runs of masked tokens, in order."""
        runs, current = [], []
        for token, masked in zip(self.input_ids, self.assistant_mask):
            if masked:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        return runs

    def check(self) -> None:
        logps = self.sampled_logps if self.sampled_logps is not None else self.input_ids
        if not len(self.input_ids) == len(self.assistant_mask) == len(logps):
            raise ValueError(f"trajectory {self.scenario_id}: ids, mask and log-probs differ in length")
        if not any(self.assistant_mask):
            raise ValueError(f"trajectory {self.scenario_id}: assistant mask is all zeros")


def render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_reply(tokenizer, tokens: list[int]) -> str:
    """A sampled reply as text: without its end-of-turn token, special tokens and outer whitespace."""
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True).strip()


def conversations_from(rows, roles: tuple[str, ...] | None = None) -> list[list[dict]]:
    """Conversations from a served model's input (a DataFrame ``messages`` column, or a list): each
    must be a non-empty list of ``{role, content}`` messages, with ``role`` in ``roles`` when given."""
    rows = rows["messages"].tolist() if hasattr(rows, "columns") else list(rows)
    allowed = f" with role {'|'.join(roles)}" if roles else ""
    out = []
    for i, messages in enumerate(rows):
        messages = [dict(m) for m in messages]
        if not messages or any(
            not {"role", "content"} <= set(m) or (roles and m["role"] not in roles) for m in messages
        ):
            raise ValueError(f"row {i}: messages must be a non-empty list of {{role, content}}{allowed}")
        out.append(messages)
    return out


def user_turn_text(tokenizer, content: str, role: str = "user") -> str:
    """The template text that follows an assistant turn's end-of-turn token and opens a ``role``
    (user or tool) turn plus the next assistant prompt. Derived from the chat template, not
    hard-coded."""
    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    closed = render(tokenizer, probe, False)
    marker = "a" + tokenizer.eos_token
    k = closed.rfind(marker)
    if k < 0:
        raise NotImplementedError(
            "the chat template does not end assistant turns with the eos token; multi-turn rollouts need it"
        )
    following = render(tokenizer, probe + [{"role": role, "content": content}], True)
    if not following.startswith(closed):
        raise NotImplementedError(
            "the chat template re-renders earlier turns; multi-turn rollouts need a prefix-stable template"
        )
    return closed[k + len(marker) :] + following[len(closed) :]


def user_prompt(scenario: Scenario, messages: list[dict]) -> list[dict]:
    """The LLM user's view: its persona and goal as the system prompt, the agent's replies as the
    messages it reads (role ``user``) and its own earlier messages as ``assistant``."""
    flip = {"assistant": "user", "user": "assistant"}
    system = USER_SIMULATOR.format(
        domain=scenario.domain.replace("_", " "), persona=scenario.persona, goal=scenario.goal
    )
    return [{"role": "system", "content": system}] + [
        {"role": flip[m["role"]], "content": m["content"]} for m in messages if m["role"] in flip
    ]


def row_seed(*keys: int) -> int:
    """A seed for one row's random stream, derived from integer keys (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class RowSampler(LogitsProcessor):
    """Sampling at ``temperature`` and ``top_p`` with one random stream per row, under greedy
    decoding by the Gumbel-max trick: argmax(logits / T - log E) with E ~ Exp(1), drawn from the
    row's own generator, is a sample of softmax(logits / T). transformers' sampler draws one stream
    for the whole batch, so a row's tokens there depend on which rows share its batch.

    ``temperature`` and ``top_p`` are one value for all rows or one per row (the server batches
    requests with their own settings); a row at temperature 0 is decoded greedily. A row's stream
    is a seed or a generator that goes on where it was (the server's rows outlive one sampler)."""

    def __init__(
        self, seeds: list[int | torch.Generator], temperature: float | list[float], top_p: float | list[float]
    ):
        n = len(seeds)
        self.generators = [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(s) for s in seeds]
        temperature = temperature if isinstance(temperature, list) else [temperature] * n
        top_p = top_p if isinstance(top_p, list) else [top_p] * n
        self.sampled = [t > 0 for t in temperature]
        self.temperature = torch.tensor([t if t > 0 else 1.0 for t in temperature]).unsqueeze(1)
        self.top_p: dict[float, list[int]] = {}  # transformers' top-p filter, applied to the rows of each value
        for i, p in enumerate(top_p):
            if p < 1.0 and self.sampled[i]:
                self.top_p.setdefault(p, []).append(i)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature.to(scores.device)
        for p, rows in self.top_p.items():
            scores[rows] = TopPLogitsWarper(p)(input_ids, scores[rows])
        width = scores.shape[1]
        noise = torch.stack(
            [
                torch.empty(width).exponential_(generator=g) if s else torch.ones(width)
                for g, s in zip(self.generators, self.sampled)
            ]
        )
        return scores - noise.log().to(scores.device)


class SampledLogprobs(LogitsProcessor):
    """Each row's log-probability of the tokens it samples under softmax(logits / ``temperature``),
    before constraints or top-p: the distribution the update scores them under. It goes first in
    the list; each call takes the token the last one led to (``input_ids[:, -1]``), and
    :meth:`finish` the last token. transformers' generate can return every step's scores, but over
    the whole 49,152-token vocabulary, and after the processors."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.taken.append(self.last.gather(1, input_ids[:, -1:]))
        self.last = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def finish(self, sequences: torch.Tensor) -> list[list[float]]:
        """Each row's log-probs of its new tokens, given generate's output ``sequences``."""
        taken = [*self.taken, self.last.gather(1, sequences[:, -1:])] if self.last is not None else []
        return torch.cat(taken, 1).tolist() if taken else [[] for _ in sequences]


class RowConstraints(LogitsProcessor):
    """Each row's constraint applied before sampling: a callable from the row's new tokens to the
    tokens allowed next, or None (grpo/structured.py ``call_constraint``); a row whose constraint is
    None, or returns None, is free."""

    def __init__(self, constraints: list[Callable[[list[int]], list[int] | None] | None]):
        self.constraints = constraints
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]  # generate's first call holds the prompt only
        for i, constraint in enumerate(self.constraints):
            allowed = constraint(input_ids[i, self.start :].tolist()) if constraint is not None else None
            if allowed is not None:
                keep_only(scores[i], allowed)
        return scores


def keep_only(scores: torch.Tensor, allowed: list[int]) -> None:
    """Set one row's scores to -inf, in place, but at the ``allowed`` tokens."""
    keep = torch.full_like(scores, float("-inf"))
    keep[allowed] = 0
    scores += keep


def shared_prefix_cache(model, prompts: list[list[int]]):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt
    and copied to the rows that share it (a group's episodes all start from the same prompt), or
    None when every prompt is distinct. Its columns are those of the left-padded batch but its
    last, so ``generate`` then prefills only the last token of each row.

    transformers' generate prefills every row, so a group of G identical prompts costs G times
    the prefill, which dominates a short rollout turn (bench/generate.py); it takes a ready cache
    (``past_key_values``) but does not look for shared rows itself."""
    first: dict[tuple, int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    if len(first) == len(prompts) or min(map(len, prompts)) < 2:
        return None
    return prompt_cache(model, [list(p[:-1]) for p in first], index, next(model.parameters()).device)[0]


class TurnCache:
    """A rollout's KV cache, kept from one agent turn to the next, so that a later turn prefills only
    what each conversation added since (the tool or user message, and the reply's last token, whose
    KV generate never computes), not the whole conversation again.

    transformers' generate continues from a cache whose rows hold the first columns of its input
    (it prefills the rest), but it does not keep one across calls of different lengths. Here each
    row's cached columns are the last call's left-padded prompt and reply, with the padding after
    the reply's eos; the next input appends each row's new tokens, left-padded again. The attention
    mask hides both gaps and generate's positions (the mask's running count) skip them, so every
    token sees the conversation a fresh prefill would show it, at the same positions."""

    def __init__(self):
        self.cache = None  # the last call's transformers cache, one row per conversation
        self.ids: torch.Tensor | None = None  # (rows, cache length): the tokens the cache holds
        self.mask: torch.Tensor | None = None  # 1 where the column is one of the row's tokens
        self.row_of: dict[int, int] = {}  # conversation -> cache row

    def take(self, rows: list[int], prompts: list[list[int]], pad: int):
        """``(input_ids, attention_mask, cache)`` that continue the kept cache with each prompt's
        new tokens, for the conversations ``rows``; None (prefill afresh) when one of them is not
        kept or its prompt does not continue what the cache holds. The cache is handed on, not kept."""
        if self.cache is None or any(r not in self.row_of for r in rows):
            return None
        index = torch.tensor([self.row_of[r] for r in rows], device=self.ids.device)
        ids, mask = self.ids[index], self.mask[index]
        news = []
        for p, held in zip(prompts, (i[m.bool()].tolist() for i, m in zip(ids, mask))):
            if len(p) <= len(held) or p[: len(held)] != held:
                return None
            news.append(p[len(held) :])
        width = max(map(len, news))
        tail = torch.full((len(news), width), pad, dtype=torch.long)
        tail_mask = torch.zeros_like(tail)
        for k, n in enumerate(news):
            tail[k, width - len(n) :] = torch.tensor(n)
            tail_mask[k, width - len(n) :] = 1
        cache, self.cache = self.cache, None
        cache.reorder_cache(index)  # the rows of this call, in its order
        return torch.cat([ids, tail.to(ids.device)], 1), torch.cat([mask, tail_mask.to(ids.device)], 1), cache

    def keep(self, rows: list[int], sequences: torch.Tensor, mask: torch.Tensor, replies: list[list[int]], cache):
        """Keep ``cache`` after a generate call on ``rows`` that returned ``sequences`` from the
        input with attention ``mask``; ``replies`` are the new tokens up to each row's eos."""
        held = cache.get_seq_length()  # every column but the last sampled token's
        new = torch.zeros(len(rows), sequences.shape[1] - mask.shape[1], dtype=mask.dtype, device=mask.device)
        for k, r in enumerate(replies):
            new[k, : len(r)] = 1
        self.cache, self.ids = cache, sequences[:, :held]
        self.mask = torch.cat([mask, new], 1)[:, :held]
        self.row_of = {r: k for k, r in enumerate(rows)}


class ConversationEnvironment:
    """Runs episodes of up to ``max_turns`` agent turns against each scenario's user and tools."""

    def __init__(self, tokenizer, config: RolloutConfig | None = None):
        self.tok = tokenizer
        self.config = config or RolloutConfig()
        self.template_tools = template_declares_tools(tokenizer)
        self.stats: dict = {}

    def first_messages(self, scenario: Scenario) -> list[dict]:
        """The scenario's opening messages, its tools declared as text unless the chat template
        declares them (:meth:`start` then passes their schemas to the template)."""
        return scenario.first_messages(declare_tools=not self.template_tools)

    def start(self, scenario: Scenario, group: int) -> Trajectory:
        messages = self.first_messages(scenario)
        tools = schemas(scenario.tools) if self.template_tools and scenario.tools else None
        ids = encode(self.tok, render(self.tok, messages, True, tools))
        return Trajectory(scenario.id, group, messages, ids, [0] * len(ids))

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: list[list[int]],
        do_sample: bool = True,
        max_new_tokens: int | None = None,
        seeds: list[int] | None = None,
        processors: list | None = None,
        streamer=None,
        kept: TurnCache | None = None,
        rows: list[int] | None = None,
        logprobs: bool = False,
    ):
        """One batched generate call; returns each row's new tokens up to and including eos. With
        ``seeds`` (and ``do_sample``), each row samples from its own stream (:class:`RowSampler`).
        ``processors`` (logits processors, e.g. grpo/structured.py's) apply before sampling;
        ``streamer`` (a transformers ``BaseStreamer``) is handed each step's tokens as they are sampled.
        ``kept`` (with ``share_prefix``), a rollout's :class:`TurnCache` of the conversations ``rows``:
        the call continues it where the prompts continue it, and leaves its own cache in it.
        With ``logprobs``, returns ``(replies, each reply's sampled log-probs)`` (:class:`SampledLogprobs`)."""
        device = next(model.parameters()).device
        pad = self.tok.pad_token_id
        kept = kept if self.config.share_prefix else None
        continued = kept.take(rows, prompts, pad) if kept is not None else None
        if continued is None:
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding
                ids[i, width - len(p) :] = torch.tensor(p)
                attn[i, width - len(p) :] = 1
        per_row = do_sample and seeds is not None
        recorder = SampledLogprobs(self.config.temperature) if logprobs else None
        sampling = {
            "do_sample": do_sample and not per_row,
            "logits_processor": LogitsProcessorList(([recorder] if recorder else []) + (processors or [])),
        }
        if per_row:
            sampler = RowSampler(seeds, self.config.temperature, self.config.top_p)
            sampling["logits_processor"].append(sampler)
        elif do_sample:
            sampling.update(temperature=self.config.temperature, top_p=self.config.top_p, top_k=0)
        if continued is not None:
            ids, attn, sampling["past_key_values"] = continued
        else:
            ids, attn = ids.to(device), attn.to(device)
            if self.config.share_prefix:
                sampling["past_key_values"] = shared_prefix_cache(model, prompts)
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            **sampling,
            pad_token_id=pad,
            eos_token_id=self.tok.eos_token_id,
            streamer=streamer,
            return_dict_in_generate=True,
        )
        eos = self.tok.eos_token_id
        replies = [
            row[: row.index(eos) + 1] if eos in row else row for row in out.sequences[:, ids.shape[1] :].tolist()
        ]
        if kept is not None:
            kept.keep(rows, out.sequences, attn, replies, out.past_key_values)
        if recorder is not None:
            return replies, [lp[: len(r)] for lp, r in zip(recorder.finish(out.sequences), replies)]
        return replies

    def decode(self, toks: list[int]) -> str:
        return decode_reply(self.tok, toks)

    def add_context(self, t: Trajectory, role: str, content: str) -> None:
        delta = encode(self.tok, user_turn_text(self.tok, content, role))
        t.input_ids += delta
        t.assistant_mask += [0] * len(delta)
        if t.sampled_logps is not None:
            t.sampled_logps += [0.0] * len(delta)
        t.messages.append({"role": role, "content": content})

    def llm_user_replies(
        self, model, trajs: list[Trajectory], scen: list[Scenario], do_sample: bool, seeds: list[int] | None = None
    ) -> list[str | None]:
        """One batched generation of the LLM user's next messages; None where it wrote DONE. When
        the user model is the PEFT policy itself, it speaks with the adapter disabled (the base)."""
        prompts = [encode(self.tok, render(self.tok, user_prompt(s, t.messages), True)) for t, s in zip(trajs, scen)]
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with off:
            out = self.generate(model, prompts, do_sample, self.config.user_max_tokens, seeds)
        texts = [self.decode(o) for o in out]
        return [None if not x or x.upper().startswith("DONE") else x for x in texts]

    def rollout(
        self,
        model,
        scenarios: list[Scenario],
        group_size: int,
        do_sample: bool = True,
        user_model=None,
        seeds: list[int] | None = None,
        logprobs: bool = False,
    ) -> list[Trajectory]:
        """``group_size`` episodes per scenario; trajectory ``i`` belongs to group ``i // group_size``.
        ``user_model`` plays the LLM user (default: ``model``, with its adapter disabled if it has one).
        ``seeds``, one per trajectory, give each episode its own random streams (one per turn and
        speaker), independent of the batch. With ``logprobs``, each trajectory keeps the sampler's
        log-prob of every token it sampled (``sampled_logps``)."""
        was_training = model.training
        model.eval()
        trajs = [self.start(s, g) for g, s in enumerate(scenarios) for _ in range(group_size)]
        if logprobs:
            for t in trajs:
                t.sampled_logps = [0.0] * len(t.input_ids)
        scen = [s for s in scenarios for _ in range(group_size)]
        backends = [copy.deepcopy(s.backend) for s in scen]  # tool calls write to the episode's copy
        replies = [0] * len(trajs)  # user messages given after the opening
        done = [False] * len(trajs)
        eos = self.tok.eos_token_id
        t0, generated = time.perf_counter(), 0
        kept = TurnCache()  # the agent's cache from turn to turn (share_prefix)

        def turn_seeds(rows: list[int], turn: int, speaker: int) -> list[int] | None:
            return None if seeds is None else [row_seed(seeds[i], turn, speaker) for i in rows]

        @functools.cache  # one per tool set and ids in this rollout: its enforcer keeps the prefixes it has seen
        def strict_calls(tools: tuple[str, ...], ids: tuple[str, ...]):
            return call_constraint(self.tok, grounded_schemas(list(tools), ids)) if tools else None

        def user_ids(t: Trajectory) -> tuple[str, ...]:
            return given_ids("\n".join(m["content"] for m in t.messages if m["role"] == "user"))

        for turn in range(self.config.max_turns):
            active = [i for i in range(len(trajs)) if not done[i]]
            if not active:
                break
            prompts = [trajs[i].input_ids for i in active]
            strict = None  # strict tool calls in a turn whose call would run
            if self.config.strict_tool_calls and turn + 1 < self.config.max_turns:
                strict = [RowConstraints([strict_calls(tuple(scen[i].tools), user_ids(trajs[i])) for i in active])]
            new = self.generate(
                model,
                prompts,
                do_sample,
                None,
                turn_seeds(active, turn, 0),
                processors=strict,
                kept=kept,
                rows=active,
                logprobs=logprobs,
            )
            new, lps = new if logprobs else (new, [None] * len(new))
            waiting = []  # trajectories whose agent turn ended without a tool call: the user speaks
            for i, toks, lp in zip(active, new, lps):
                t = trajs[i]
                generated += len(toks)
                t.input_ids += toks
                t.assistant_mask += [1] * len(toks)
                if lp is not None:
                    t.sampled_logps += lp
                t.turns += 1
                if not toks or toks[-1] != eos:  # cut at max_new_tokens: close the turn as context
                    t.truncated_turns += 1
                    t.input_ids.append(eos)
                    t.assistant_mask.append(0)
                    if lp is not None:
                        t.sampled_logps.append(0.0)
                text = self.decode(toks)
                t.messages.append({"role": "assistant", "content": text})
                if turn + 1 == self.config.max_turns:
                    continue
                call = parse_call(text)
                if call is not None:
                    result, ok = call_tool(*call, scen[i].tools, backends[i])
                    t.tool_calls += 1
                    t.tool_errors += not ok
                    t.tool_malformed += not call[0]  # parse_call's name is "" for a malformed call
                    self.add_context(t, "tool", result)
                else:
                    waiting.append(i)
            if self.config.user == "llm" and waiting:
                answers = self.llm_user_replies(
                    user_model or model,
                    [trajs[i] for i in waiting],
                    [scen[i] for i in waiting],
                    do_sample,
                    turn_seeds(waiting, turn, 1),
                )
            else:
                answers = [
                    scen[i].followups[replies[i]] if replies[i] < len(scen[i].followups) else None for i in waiting
                ]
            for i, answer in zip(waiting, answers):
                if answer is None:
                    done[i] = True
                else:
                    self.add_context(trajs[i], "user", answer)
                    replies[i] += 1
        for t in trajs:
            t.check()
        elapsed = time.perf_counter() - t0
        calls = sum(t.tool_calls for t in trajs)
        self.stats = {
            "gen_tokens": generated,
            "gen_seconds": elapsed,
            "gen_tokens_per_s": generated / max(elapsed, 1e-9),
            "tool_calls": calls,
            "tool_errors": sum(t.tool_errors for t in trajs),
            "tool_malformed": sum(t.tool_malformed for t in trajs),
        }
        model.train(was_training)
        return trajs


@dataclass
class RolloutJob:
    """One independent part of a stage's rollouts: the policy at ``policy`` rolls out
    ``group_size`` episodes for each of ``scenarios`` after ``torch.manual_seed(seed)``.

    Everything in it is a path or a value, so it pickles: label and evaluate hand their jobs to
    :func:`map_jobs`, which runs them one after another here, or as Prefect tasks on a Dask cluster
    (``grpo-agents run --rollout-workers N``). Each job seeds its own stream, so the result does not
    depend on where or in which order jobs ran."""

    name: str
    policy: str  # a model directory or Hugging Face id (grpo/models.py: load_policy)
    scenarios: list[Scenario]
    group_size: int
    config: RolloutConfig
    seed: int
    device: str = "auto"
    user_model: str | None = None  # plays the LLM user with `rollout.user: llm`; None: the policy itself
    threads: int | None = None  # torch threads for this job (set by a job map that runs jobs side by side)


def run_job(job: RolloutJob) -> tuple[list[Trajectory], dict]:
    """``(trajectories, generation stats)`` of one :class:`RolloutJob`; groups are numbered within the job."""
    from grpo.models import load_policy, pick_device, rollout_dtype

    if job.threads:
        torch.set_num_threads(job.threads)
    model, tokenizer = load_policy(job.policy, job.device, rollout_dtype(job.config.bf16, pick_device(job.device)))
    user = load_policy(job.user_model, job.device)[0] if job.user_model and job.config.user == "llm" else None
    torch.manual_seed(job.seed)
    env = ConversationEnvironment(tokenizer, job.config)
    trajectories = env.rollout(model, job.scenarios, job.group_size, user_model=user)
    return trajectories, env.stats


# How label's and evaluate's rollout jobs run (:func:`map_jobs`): None is one after another here.
JOB_MAP: ContextVar[Callable[[list], list] | None] = ContextVar("job_map", default=None)


@contextlib.contextmanager
def jobs_run_by(job_map: Callable[[list], list] | None) -> Iterator[None]:
    """Within this block, :func:`map_jobs` hands its jobs to ``job_map`` (jobs in, results in the
    same order out); the Prefect flow sets one that runs them on a Dask cluster."""
    token = JOB_MAP.set(job_map)
    try:
        yield
    finally:
        JOB_MAP.reset(token)


def map_jobs(jobs: list[RolloutJob], desc: str) -> list[tuple[list[Trajectory], dict]]:
    """:func:`run_job` of each job, in order: here with a progress bar, or by the job map set with
    :func:`jobs_run_by`. Each job seeds itself, so the results are the same either way."""
    from tqdm.auto import tqdm

    job_map = JOB_MAP.get()
    if job_map is not None:
        log.info("%s: %d rollout jobs on %s", desc, len(jobs), getattr(job_map, "where", "the job map"))
        return job_map(jobs)
    results = []
    for i, job in enumerate(tqdm(jobs, desc=desc, unit="job"), 1):
        log.info("%s: rollout job %d of %d: %s", desc, i, len(jobs), job.name)
        results.append(run_job(job))
    return results


def merge_jobs(results: list[tuple[list[Trajectory], dict]]) -> tuple[list[Trajectory], dict]:
    """The jobs' trajectories in job order, groups renumbered to follow on, and their summed
    generation stats."""
    out: list[Trajectory] = []
    totals = {"gen_tokens": 0.0, "gen_seconds": 0.0, "tool_calls": 0, "tool_errors": 0, "tool_malformed": 0}
    for trajectories, stats in results:
        offset = 1 + max((t.group for t in out), default=-1)
        for t in trajectories:
            t.group += offset
        out += trajectories
        totals = {k: v + stats[k] for k, v in totals.items()}
    return out, {**totals, "gen_tokens_per_s": totals["gen_tokens"] / max(totals["gen_seconds"], 1e-9)}
