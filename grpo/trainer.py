"""A GRPO training loop that reads top to bottom: sample groups, score, normalise, update.

Hand-written rather than TRL's GRPOTrainer because it offers what TRL does not: per-turn credit,
the leave-one-out baseline, skipping (and counting) updates with a non-finite gradient, and a
loop a researcher can read top to bottom.

Under torchrun (``distributed.world_size`` > 1, grpo/distributed.py) each rank rolls out and
scores its share of the step's groups (whole groups: ``scenarios_per_step`` divides by the world
size), the step's rewards are gathered so every rank computes the same advantages, and PyTorch DDP
all-reduces the LoRA gradients. Each episode samples from its own seeded stream
(grpo/rollout.py ``RowSampler``) and the loss is normalised by whole-step counts, so N processes
take the same steps as one, up to float rounding. Only rank 0 logs, checkpoints and shows progress.

``backend: trl`` runs the same multi-turn episodes through TRL's trainer (grpo/trl_backend.py), as
the ecosystem path and a reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_scheduler

from grpo import checkpoint, distributed
from grpo.config import GRPOConfig
from grpo.models import MergedSampler, autocast, lora_config, rollout_dtype, use_bf16
from grpo.objective import (
    aggregate,
    group_advantages,
    per_token_loss,
    sampler_ratio,
    token_logprobs,
    turn_advantages,
    turn_returns,
)
from grpo.rollout import ConversationEnvironment, Trajectory, row_seed
from grpo.scenarios import Scenario

log = logging.getLogger(__name__)


def log_warnings(cfg: GRPOConfig) -> None:
    for warning in cfg.warnings():
        log.warning("train_policy: %s", warning)


def add_lora(model, cfg: GRPOConfig):
    return get_peft_model(model, lora_config(cfg.lora_r, cfg.lora_alpha))


@dataclass
class MicroBatch:
    """A padded slice of the step's trajectories with everything its loss needs."""

    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor  # the loss mask, aligned with ids[:, start:]
    start: int
    advantages: torch.Tensor  # (B,) one per sequence, or (B, T - start) one per token (turn_credit)
    old_logp: torch.Tensor | None  # the sampling policy's; None with num_iterations 1 (logp.detach() is exact)
    ref_logp: torch.Tensor | None  # the base's (adapter disabled); None with beta 0
    sampler_logp: torch.Tensor | None  # the sampler's, where it is not the trained model (MergedSampler)
    prompt_lens: list[int] | None  # each row's tokens before its first sampled one (share_prefix)


def pad_batch(trajs: list[Trajectory], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded ids, attention mask, the first position any row's loss touches (``start``) and
    the loss mask aligned with ``token_logprobs(..., start)``, i.e. with ``ids[:, start:]``."""
    width = max(len(t.input_ids) for t in trajs)
    ids = torch.full((len(trajs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for i, t in enumerate(trajs):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        attn[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(t.assistant_mask)
    start = max(1, int(loss_mask.any(0).nonzero()[0]))
    return ids.to(device), attn.to(device), loss_mask[:, start:].to(device), start


def prompt_len(t: Trajectory) -> int:
    """The tokens before the trajectory's first sampled one (all of them if it has none)."""
    return t.assistant_mask.index(1) if 1 in t.assistant_mask else len(t.input_ids)


def cut_after_turn(messages: list[dict], k: int) -> list[dict]:
    """The conversation up to and including the agent's k-th reply (k from 1)."""
    seen = 0
    for i, m in enumerate(messages):
        seen += m["role"] == "assistant"
        if seen == k:
            return messages[: i + 1]
    return messages


def turn_credit_returns(
    trajs: list[Trajectory], batch: list[Scenario], totals: list, reward_fn: Callable, cfg: GRPOConfig
) -> list[list[float]]:
    """Per-turn returns: each group's conversations are scored cut after each agent turn and the
    increments discounted (:func:`grpo.objective.turn_returns`). Cut after the group's last turn
    they are whole, so their scores are the group's ``totals``, already computed."""
    returns = []
    for g, scen in enumerate(batch):
        group = trajs[g * cfg.group_size : (g + 1) * cfg.group_size]
        prefix: list[list[float]] = [[] for _ in group]
        last = max(t.turns for t in group)
        for k in range(1, last + 1):
            scores = totals[g] if k == last else reward_fn([cut_after_turn(t.messages, k) for t in group], scen)[0]
            for i, t in enumerate(group):
                if t.turns >= k:
                    prefix[i].append(float(scores[i]))
        returns += [turn_returns(p, cfg.turn_gamma) for p in prefix]
    return returns


def token_advantages(
    trajs: list[Trajectory], per_turn: list[list[float]], width: int, start: int, device
) -> torch.Tensor:
    """(B, width - start) advantages aligned with :func:`pad_batch`'s loss mask: the k-th run of
    sampled tokens (the k-th agent turn) gets the k-th turn's advantage."""
    out = torch.zeros(len(trajs), width)
    for i, (t, advs) in enumerate(zip(trajs, per_turn, strict=True)):
        k, prev = -1, 0
        for pos, m in enumerate(t.assistant_mask):
            k += bool(m and not prev)
            if m:
                out[i, pos] = advs[k]
            prev = m
    return out[:, start:].to(device)


def sample(
    model,
    scenarios: list[Scenario],
    order: list[int],
    env: ConversationEnvironment,
    cfg: GRPOConfig,
    step: int,
    sampler: MergedSampler | None = None,
):
    """The step's scenarios, taken from the seeded cycling ``order`` (consumed in place, refilled
    with a fresh shuffle when short; the same on every rank); this rank's share of them, each
    rolled out ``group_size`` times, every episode from its own stream seeded by (seed, step, group,
    member). With ``sampler``, its merged copy of ``model`` generates, and the trajectories keep its
    log-probs. Returns ``(this rank's scenarios, their trajectories, generation stats)``."""
    if len(order) < cfg.scenarios_per_step:
        order += random.sample(range(len(scenarios)), len(scenarios))
    batch = [scenarios[order.pop(0)] for _ in range(cfg.scenarios_per_step)]
    groups = distributed.shard(list(range(len(batch))))
    seeds = [row_seed(cfg.seed, step, g, j) for g in groups for j in range(cfg.group_size)]
    scens = [batch[g] for g in groups]
    if sampler is None:
        trajs = env.rollout(model, scens, cfg.group_size, seeds=seeds)
    else:  # an LLM user is the base: the policy with its adapter disabled, not the merged copy
        sampler.sync()
        trajs = env.rollout(sampler.model, scens, cfg.group_size, user_model=model, seeds=seeds, logprobs=True)
    return scens, trajs, dict(env.stats)


def score(trajs: list[Trajectory], batch: list[Scenario], reward_fn: Callable, cfg: GRPOConfig):
    """Each scenario's group scored together. Returns ``(reward tensor per group, raw components)``."""
    totals, comps = [], {}
    for g, scen in enumerate(batch):
        group = trajs[g * cfg.group_size : (g + 1) * cfg.group_size]
        total, raw = reward_fn([t.messages for t in group], scen)
        totals.append(torch.as_tensor(total, dtype=torch.float32))
        for k, v in raw.items():
            comps.setdefault(k, []).extend(np.asarray(v).tolist())
    return totals, comps


@dataclass
class Step:
    """The whole step's rollouts and scores, every rank's in rank order (one process: its own)."""

    trajs: list[Trajectory]
    totals: list[torch.Tensor]  # one per group
    comps: dict[str, list[float]]
    returns: list[list[float]] | None  # per-turn returns (turn_credit)
    gen_stats: dict


def gather_step(trajs, totals, comps, returns, gen_stats) -> Step:
    """Every rank's share of the step, so that advantages and metrics see all of it."""
    parts = distributed.all_gather((trajs, [t.tolist() for t in totals], comps, returns, gen_stats))
    merged: dict[str, list[float]] = {}
    for _, _, c, _, _ in parts:
        for k, v in c.items():
            merged.setdefault(k, []).extend(v)
    stats = [p[4] for p in parts]
    seconds = max(s["gen_seconds"] for s in stats)  # the ranks generate at the same time
    tokens = sum(s["gen_tokens"] for s in stats)
    return Step(
        trajs=[t for p in parts for t in p[0]],
        totals=[torch.tensor(t, dtype=torch.float32) for p in parts for t in p[1]],
        comps=merged,
        returns=[r for p in parts for r in p[3]] if returns is not None else None,
        gen_stats={
            "gen_tokens": tokens,
            "gen_seconds": seconds,
            "gen_tokens_per_s": tokens / max(seconds, 1e-9),
            "tool_calls": sum(s["tool_calls"] for s in stats),
            "tool_errors": sum(s["tool_errors"] for s in stats),
        },
    )


def advantages(whole: Step, cfg: GRPOConfig):
    """Group-relative advantages of the whole step, one per trajectory, or with ``turn_credit`` one
    per agent turn. Returns ``(all advantages as one flat tensor, per-turn advantages or None,
    zero-std groups)``."""
    if cfg.turn_credit:
        per_turn, zero_std = turn_advantages(whole.returns, cfg.group_size, cfg.scale_rewards)
        return torch.tensor([a for ep in per_turn for a in ep]), per_turn, zero_std
    adv, zero_std = group_advantages(
        torch.cat(whole.totals), cfg.group_size, cfg.scale_rewards, leave_one_out=cfg.leave_one_out
    )
    return adv, None, zero_std


def micro_batches(
    model,
    trajs: list[Trajectory],
    adv: torch.Tensor,
    per_turn: list[list[float]] | None,
    pad_id: int,
    cfg: GRPOConfig,
    temperature: float,
) -> list[MicroBatch]:
    """The step's trajectories in padded micro-batches with their advantages (per token from
    ``per_turn`` when given) and, without gradient, the old-policy and reference log-probs, all at
    the sampling ``temperature``."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(trajs), cfg.micro_batch_size):
        part = trajs[i : i + cfg.micro_batch_size]
        ids, attn, mask, start = pad_batch(part, pad_id, device)
        sampler_logp = None
        if part[0].sampled_logps is not None:
            sampler_logp = torch.zeros(ids.shape, dtype=torch.float32)
            for k, t in enumerate(part):
                sampler_logp[k, : len(t.sampled_logps)] = torch.tensor(t.sampled_logps)
            sampler_logp = sampler_logp[:, start:].to(device)
        if per_turn is not None:
            a = token_advantages(part, per_turn[i : i + cfg.micro_batch_size], ids.shape[1], start, device)
        else:
            a = adv[i : i + cfg.micro_batch_size].to(device)
        prompts = [prompt_len(t) for t in part] if cfg.share_prefix else None
        with torch.no_grad(), autocast(device, use_bf16(cfg.bf16, device)):
            logprobs = partial(token_logprobs, model, ids, attn, start, temperature=temperature, prompt_lens=prompts)
            old = logprobs() if cfg.num_iterations > 1 else None
            ref = None
            if cfg.beta > 0:
                with model.disable_adapter():
                    ref = logprobs()
        out.append(MicroBatch(ids, attn, mask, start, a, old, ref, sampler_logp, prompts))
    return out


def update(
    model,
    opt,
    scheduler,
    micro: list[MicroBatch],
    counts: tuple[int, int, int],
    max_len: int,
    step: int,
    cfg: GRPOConfig,
    temperature: float,
):
    """``num_iterations`` clipped-surrogate updates on the step's micro-batches, with gradient
    clipping; an update whose gradient norm is not finite is skipped (counted, never applied; the
    learning-rate schedule still advances, so it stays on the step clock). Log-probs are taken at
    the sampling ``temperature``. ``counts`` are the whole step's sequences, loss tokens and
    micro-batches, over all ranks; ``model`` is DDP-wrapped under torchrun, which averages the
    ranks' gradients, so each rank's loss is scaled by the world size to sum them. Returns
    ``(stats over all ranks, last grad norm, updates skipped)``."""
    ddp = isinstance(model, DistributedDataParallel)
    stats = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "entropy": 0.0}
    if micro[0].sampler_logp is not None:  # how far the sampler is from the update, and the correction
        stats["sampler_logp_diff"] = 0.0
        if cfg.sampler_is != "none":
            stats["sampler_ratio"] = 0.0
    skipped = 0
    for it in range(cfg.num_iterations):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for k, mb in enumerate(micro):
            # DDP all-reduces the gradients once, with the last micro-batch's backward
            accumulate = model.no_sync() if ddp and k < len(micro) - 1 else contextlib.nullcontext()
            with accumulate:
                step_loss += micro_loss(model, mb, it, stats, counts, max_len, step, cfg, temperature)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if math.isfinite(float(grad_norm)):
            opt.step()
            stats["loss"] += step_loss / cfg.num_iterations
        else:
            skipped += 1
            opt.zero_grad(set_to_none=True)
        scheduler.step()
    return dict(zip(stats, distributed.all_sum(list(stats.values())), strict=True)), grad_norm, skipped


def micro_loss(
    model, mb: MicroBatch, it: int, stats: dict, counts: tuple[int, int, int], max_len: int, step: int, cfg, temperature
) -> float:
    """Forward and backward of one micro-batch's share of the step's loss (``counts``: see
    :func:`update`); adds its entropy, KL and clip figures to ``stats``; returns its loss."""
    n_seqs, n_tokens, n_micro = counts
    # under DDP the shared prompts go through the bare module: DDP expects one forward per backward
    bare = model.module if isinstance(model, DistributedDataParallel) else model
    logprobs = partial(
        token_logprobs,
        model,
        mb.ids,
        mb.attn,
        mb.start,
        temperature=temperature,
        prompt_lens=mb.prompt_lens,
        prefix_model=bare,
    )
    with autocast(mb.ids.device, use_bf16(cfg.bf16, mb.ids.device)):
        if it == 0:  # the entropy of the sampling policy, on the tokens it sampled
            logp, ent = logprobs(entropy=True)
            stats["entropy"] += (ent * mb.mask).sum().item() / n_tokens
        else:
            logp = logprobs()
    m = mb.mask.bool()
    for what, lp in (("log-probs", logp), ("old log-probs", mb.old_logp), ("reference log-probs", mb.ref_logp)):
        if lp is not None:
            check_finite(lp.detach()[m], what, step + 1)
    old_logp = mb.old_logp if mb.old_logp is not None else logp.detach()
    weight = None
    if mb.sampler_logp is not None:
        weight = sampler_ratio(
            old_logp, mb.sampler_logp, mb.mask, cfg.sampler_is, cfg.sampler_is_min, cfg.sampler_is_max
        )
        if it == 0:
            stats["sampler_logp_diff"] += (old_logp - mb.sampler_logp)[m].abs().sum().item() / n_tokens
            if weight is not None:
                stats["sampler_ratio"] += weight.expand_as(logp)[m].sum().item() / n_tokens
    loss_tok, kl, lo, hi = per_token_loss(
        logp,
        old_logp,
        mb.advantages,
        cfg.epsilon,
        cfg.epsilon_high,
        mb.ref_logp,
        cfg.beta,
        mb.mask,
        cfg.importance_sampling_level,
        cfg.use_bias_correction_kl,
        weight,
    )
    loss = aggregate(loss_tok, mb.mask, cfg.loss_type, n_seqs, n_tokens, max_len, n_micro)
    check_finite(loss.detach(), "loss", step + 1)
    (loss * distributed.world()).backward()
    stats["kl"] += (kl[m].sum().item() if kl is not None else 0.0) / n_tokens / cfg.num_iterations
    stats["clip_low"] += lo[m].sum().item() / n_tokens / cfg.num_iterations
    stats["clip_high"] += hi[m].sum().item() / n_tokens / cfg.num_iterations
    return loss.item()


def check_finite(x: torch.Tensor, what: str, step: int) -> None:
    """Stop the run at the step (counted from 1, as the progress bar and MLflow do) where a NaN or an
    infinity appears, before an update uses it: a run that raises here writes no policy, so it never
    reaches evaluate or the registry."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {what} ({bad} of {x.numel()} values)")


def reward_metrics(rewards: torch.Tensor, comps: dict, adv: torch.Tensor, zero_std: int, n_groups: int) -> dict:
    """The reward and advantage figures of a step's metrics row (both backends)."""
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{f"reward/{k}": float(np.mean(v)) for k, v in comps.items()},
        "advantage_std": float(adv.std()),
        "zero_std_group_frac": zero_std / n_groups,
    }


def truncated_turn_frac(trajs: list[Trajectory]) -> float:
    """The share of agent turns cut at ``max_new_tokens``."""
    return sum(t.truncated_turns for t in trajs) / max(1, sum(t.turns for t in trajs))


def generation_metrics(gen_stats: dict) -> dict:
    """Generation throughput and tool use from a rollout's ``env.stats`` (both backends)."""
    calls = gen_stats["tool_calls"]
    return {
        "gen_tokens_per_s": gen_stats["gen_tokens_per_s"],
        "tool_calls": calls,
        "tool_success_rate": 1 - gen_stats["tool_errors"] / calls if calls else float("nan"),
    }


def step_metrics(
    step: int,
    trajs: list[Trajectory],
    totals: list[torch.Tensor],
    comps: dict,
    adv: torch.Tensor,
    zero_std: int,
    gen_stats: dict,
    stats: dict,
    grad_norm,
    skipped: int,
    n_tokens: int,
    update_s: float,
    t0: float,
    cfg: GRPOConfig,
) -> dict:
    """The step's metrics row."""
    return {
        "step": step + 1,
        **reward_metrics(torch.cat(totals), comps, adv, zero_std, len(totals)),
        "completion_length": sum(sum(t.assistant_mask) for t in trajs) / len(trajs),
        "truncated_turn_frac": truncated_turn_frac(trajs),
        "grad_norm": float(grad_norm),
        "skipped_steps": skipped,
        **generation_metrics(gen_stats),
        "update_tokens_per_s": n_tokens * cfg.num_iterations / max(update_s, 1e-9),
        "step_seconds": time.perf_counter() - t0,
        **stats,
    }


def run_identity(cfg: GRPOConfig, scenarios: list[Scenario], env: ConversationEnvironment, fingerprint: dict | None):
    """What a checkpoint must match to be resumed (both backends)."""
    return {
        **cfg.model_dump(),
        "scenarios": [s.id for s in scenarios],
        "rollout": env.config.model_dump(),
        **(fingerprint or {}),
    }


def train(
    model,
    tokenizer,
    scenarios: list[Scenario],
    reward_fn: Callable,
    env: ConversationEnvironment,
    cfg: GRPOConfig,
    on_step: Callable[[int, dict], None] | None = None,
    checkpoint_dir: str | None = None,
    fingerprint: dict | None = None,
):
    """Train LoRA adapters on ``model`` with GRPO. ``reward_fn(conversations, scenario)`` returns
    ``(totals, raw_components)`` for one group. Returns ``(peft_model, history)``.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every``, a checkpoint is written every N steps and
    a rerun of the same run resumes from it; it is removed when training completes. A run is the
    same when ``cfg``, the scenarios, the rollout settings and ``fingerprint`` (what the caller
    knows of the rest: reward, calibration, models) are."""
    log_warnings(cfg)
    if cfg.scenarios_per_step % distributed.world():  # torchrun started by hand (multi-node) decides the world
        raise ValueError(f"scenarios_per_step {cfg.scenarios_per_step} must divide by the {distributed.world()} ranks")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg)
    # under torchrun: the LoRA gradients all-reduced (the ranks' identical seeds give identical
    # initial adapters; DDP broadcasts rank 0's anyway). The buffers (rotary tables) are constant.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if distributed.world() > 1 else model
    main = distributed.is_main()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    # transformers' scheduler: the one TRL's trainer builds from the same two settings
    scheduler = get_scheduler(cfg.lr_scheduler_type, opt, 0, cfg.steps * cfg.num_iterations)
    order = random.sample(range(len(scenarios)), len(scenarios))
    history, skipped, first = [], 0, 0
    max_len = env.config.max_new_tokens * env.config.max_turns  # dr_grpo's normaliser
    temperature = env.config.temperature
    run_config = run_identity(cfg, scenarios, env, fingerprint)
    if checkpoint_dir and cfg.checkpoint_every:
        resumed = checkpoint.load(checkpoint_dir, model, opt, run_config)
        if resumed:
            first, state = resumed
            order, history, skipped = state["order"], state["history"], state["skipped"]
            scheduler.load_state_dict(state["scheduler"])
    # rollout.bf16 where the policy is not in bf16 already: rollouts from a merged bf16 copy
    dtype = rollout_dtype(env.config.bf16, next(model.parameters()).device)
    sampler = MergedSampler(model, dtype) if dtype != next(model.parameters()).dtype else None
    bar = tqdm(range(first, cfg.steps), desc="GRPO", unit="step", initial=first, total=cfg.steps, disable=not main)
    for step in bar:
        t0 = time.perf_counter()
        # 1. sample: this rank's share of the step's scenarios, group_size episodes each
        batch, trajs, gen_stats = sample(model, scenarios, order, env, cfg, step, sampler)
        # 2. score each group; gather every rank's scores
        totals, comps = score(trajs, batch, reward_fn, cfg)
        returns = turn_credit_returns(trajs, batch, totals, reward_fn, cfg) if cfg.turn_credit else None
        whole = gather_step(trajs, totals, comps, returns, gen_stats)
        check_finite(torch.cat(whole.totals), "rewards", step + 1)
        # 3. group-relative (or per-turn) advantages of the whole step; this rank's share of them
        # (with turn_credit the per-turn lists are used and the flat tensor only logged)
        adv_all, per_turn_all, zero_std = advantages(whole, cfg)
        check_finite(adv_all, "advantages", step + 1)
        adv, per_turn = distributed.shard(adv_all), per_turn_all and distributed.shard(per_turn_all)
        # 4. micro-batches with old-policy and reference log-probs, then the clipped-surrogate updates
        model.train()
        micro = micro_batches(model, trajs, adv, per_turn, tokenizer.pad_token_id, cfg, temperature)
        counts = distributed.all_sum([len(trajs), sum(int(mb.mask.sum()) for mb in micro), len(micro)])
        n_seqs, n_tokens, n_micro = (int(c) for c in counts)
        t_upd = time.perf_counter()
        stats, grad_norm, skips = update(
            ddp, opt, scheduler, micro, (n_seqs, n_tokens, n_micro), max_len, step, cfg, temperature
        )
        skipped += skips
        update_s = time.perf_counter() - t_upd
        # 5. log, report and checkpoint (rank 0)
        row = step_metrics(
            step,
            whole.trajs,
            whole.totals,
            whole.comps,
            adv_all,
            zero_std,
            whole.gen_stats,
            stats,
            grad_norm,
            skipped,
            n_tokens,
            update_s,
            t0,
            cfg,
        )
        history.append(row)
        if not main:
            continue
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}")
        if on_step:
            on_step(step + 1, row)
        if checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            state = {"order": order, "history": history, "skipped": skipped, "scheduler": scheduler.state_dict()}
            checkpoint.save(checkpoint_dir, step + 1, model, opt, state, run_config)
    if checkpoint_dir and main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return model, history
