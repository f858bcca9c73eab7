"""A GRPO training loop that reads top to bottom: sample groups, score, normalise, update.

Hand-written rather than TRL's GRPOTrainer because it offers what TRL does not: per-turn credit,
the leave-one-out baseline, skipping (and counting) updates with a non-finite gradient, and a
loop a researcher can read top to bottom. ``backend: trl`` runs the same multi-turn episodes
through TRL's trainer (grpo/trl_backend.py), as the ecosystem path and a reference.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from grpo import checkpoint
from grpo.objective import aggregate, group_advantages, per_token_loss, token_logprobs, turn_advantages, turn_returns
from grpo.rollout import ConversationEnvironment, Trajectory
from grpo.scenarios import Scenario


@dataclass
class GRPOConfig:
    steps: int = 16                 # optimisation steps (one generation round each)
    scenarios_per_step: int = 4     # groups per step
    group_size: int = 4             # completions per scenario
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    beta: float = 0.04              # k3 KL weight; 0 skips the reference forward entirely
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    loss_type: str = "grpo"         # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"    # group | batch | none
    leave_one_out: bool = False     # RLOO baseline instead of the group mean
    importance_sampling_level: str = "token"  # token (GRPO) | sequence (GSPO)
    num_iterations: int = 1         # updates per generation round
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0       # steps between checkpoints; 0 disables them
    turn_credit: bool = False       # each agent turn's tokens get their own discounted return
    turn_gamma: float = 0.9         # discount of later turns' contributions (turn_credit)
    backend: str = "native"         # native (this loop) | trl (grpo/trl_backend.py)
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> "GRPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise KeyError(f"train_policy: unknown parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**params)


def add_lora(model, cfg: GRPOConfig):
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


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


def cut_after_turn(messages: list[dict], k: int) -> list[dict]:
    """The conversation up to and including the agent's k-th reply (k from 1)."""
    seen = 0
    for i, m in enumerate(messages):
        seen += m["role"] == "assistant"
        if seen == k:
            return messages[: i + 1]
    return messages


def turn_credit_advantages(trajs: list[Trajectory], batch: list[Scenario], totals: list, reward_fn: Callable,
                           cfg: "GRPOConfig"):
    """Per-turn advantages: each group's conversations are scored cut after each agent turn, the
    increments discounted into per-turn returns (:func:`grpo.objective.turn_returns`) and
    normalised within the group. Cut after the group's last turn they are whole, so their scores
    are the group's ``totals``, already computed. Returns ``(advantages per trajectory per turn,
    zero_std_groups)``."""
    returns = []
    for g, scen in enumerate(batch):
        group = trajs[g * cfg.group_size:(g + 1) * cfg.group_size]
        prefix: list[list[float]] = [[] for _ in group]
        last = max(t.turns for t in group)
        for k in range(1, last + 1):
            scores = totals[g] if k == last else reward_fn([cut_after_turn(t.messages, k) for t in group], scen)[0]
            for i, t in enumerate(group):
                if t.turns >= k:
                    prefix[i].append(float(scores[i]))
        returns += [turn_returns(p, cfg.turn_gamma) for p in prefix]
    return turn_advantages(returns, cfg.group_size, cfg.scale_rewards)


def token_advantages(trajs: list[Trajectory], per_turn: list[list[float]], width: int, start: int, device) -> torch.Tensor:
    """(B, width - start) advantages aligned with :func:`pad_batch`'s loss mask: the k-th run of
    sampled tokens (the k-th agent turn) gets the k-th turn's advantage."""
    out = torch.zeros(len(trajs), width)
    for i, (t, advs) in enumerate(zip(trajs, per_turn)):
        k, prev = -1, 0
        for pos, m in enumerate(t.assistant_mask):
            k += bool(m and not prev)
            if m:
                out[i, pos] = advs[k]
            prev = m
    return out[:, start:].to(device)


def train(model, tokenizer, scenarios: list[Scenario], reward_fn: Callable, env: ConversationEnvironment,
          cfg: GRPOConfig, on_step: Callable[[int, dict], None] | None = None, checkpoint_dir: str | None = None):
    """Train LoRA adapters on ``model`` with GRPO. ``reward_fn(conversations, scenario)`` returns
    ``(totals, raw_components)`` for one group. Returns ``(peft_model, history)``.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every``, a checkpoint is written every N steps and
    a rerun of the same configuration resumes from it; it is removed when training completes."""
    if cfg.turn_credit and cfg.importance_sampling_level == "sequence":
        raise ValueError("turn_credit gives each turn its own advantage; it cannot be combined with "
                         "importance_sampling_level: sequence (GSPO), which shares one ratio per sequence")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    order = random.sample(range(len(scenarios)), len(scenarios))
    history, skipped, first = [], 0, 0
    run_config = {**asdict(cfg), "scenarios": [s.id for s in scenarios]}
    if checkpoint_dir and cfg.checkpoint_every:
        resumed = checkpoint.load(checkpoint_dir, model, opt, run_config)
        if resumed:
            first, state = resumed
            order, history, skipped = state["order"], state["history"], state["skipped"]
    bar = tqdm(range(first, cfg.steps), desc="GRPO", unit="step", initial=first, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        # 1. sample groups: scenarios cycle in a seeded shuffled order
        if len(order) < cfg.scenarios_per_step:
            order += random.sample(range(len(scenarios)), len(scenarios))
        batch = [scenarios[order.pop(0)] for _ in range(cfg.scenarios_per_step)]
        trajs = env.rollout(model, batch, cfg.group_size)
        gen_stats = dict(env.stats)

        # 2. score each group, 3. group-relative advantages
        totals, comps = [], {}
        for g, scen in enumerate(batch):
            group = trajs[g * cfg.group_size:(g + 1) * cfg.group_size]
            total, raw = reward_fn([t.messages for t in group], scen)
            totals.append(torch.as_tensor(total, dtype=torch.float32))
            for k, v in raw.items():
                comps.setdefault(k, []).extend(np.asarray(v).tolist())
        rewards = torch.cat(totals)
        if cfg.turn_credit:
            per_turn, zero_groups = turn_credit_advantages(trajs, batch, totals, reward_fn, cfg)
            adv = torch.tensor([a for ep in per_turn for a in ep])
        else:
            adv, zero_groups = group_advantages(rewards, cfg.group_size, cfg.scale_rewards, leave_one_out=cfg.leave_one_out)

        # 4. old-policy and reference log-probs, then the clipped-surrogate updates
        model.train()
        micro = [list(range(i, min(i + cfg.micro_batch_size, len(trajs)))) for i in range(0, len(trajs), cfg.micro_batch_size)]
        padded = [pad_batch([trajs[i] for i in idx], tokenizer.pad_token_id, device) for idx in micro]
        n_tokens = sum(int(p[2].sum()) for p in padded)
        if cfg.turn_credit:
            advs = [token_advantages([trajs[i] for i in idx], [per_turn[i] for i in idx], ids.shape[1], start, device)
                    for idx, (ids, _, _, start) in zip(micro, padded)]
        else:
            advs = [adv[idx].to(device) for idx in micro]
        old, ref = [], []
        with torch.no_grad():
            for ids, attn, _, start in padded:
                old.append(token_logprobs(model, ids, attn, start) if cfg.num_iterations > 1 else None)
                if cfg.beta > 0:
                    with model.disable_adapter():
                        ref.append(token_logprobs(model, ids, attn, start))
                else:
                    ref.append(None)
        t_upd = time.perf_counter()
        stats = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "entropy": 0.0}
        for it in range(cfg.num_iterations):
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for (ids, attn, mask, start), a, o, r in zip(padded, advs, old, ref):
                if it == 0:  # the entropy of the sampling policy, on the tokens it sampled
                    logp, ent = token_logprobs(model, ids, attn, start, entropy=True)
                    stats["entropy"] += (ent * mask).sum().item() / n_tokens
                else:
                    logp = token_logprobs(model, ids, attn, start)
                old_logp = o if o is not None else logp.detach()
                loss_tok, kl, lo, hi = per_token_loss(logp, old_logp, a, cfg.epsilon, cfg.epsilon_high,
                                                      r, cfg.beta, mask, cfg.importance_sampling_level)
                loss = aggregate(loss_tok, mask, cfg.loss_type, len(trajs), n_tokens, env.max_new_tokens * env.max_turns)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: non-finite loss {loss.item()}")
                loss.backward()
                step_loss += loss.item()
                m = mask.bool()
                stats["kl"] += (kl[m].sum().item() if kl is not None else 0.0) / n_tokens / cfg.num_iterations
                stats["clip_low"] += lo[m].sum().item() / n_tokens / cfg.num_iterations
                stats["clip_high"] += hi[m].sum().item() / n_tokens / cfg.num_iterations
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                skipped += 1  # counted and reported, never applied
                opt.zero_grad(set_to_none=True)
                continue
            opt.step()
            stats["loss"] += step_loss / cfg.num_iterations
        update_s = time.perf_counter() - t_upd

        row = {
            "step": step + 1,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{f"reward/{k}": float(np.mean(v)) for k, v in comps.items()},
            "advantage_std": float(adv.std()),
            "zero_std_group_frac": zero_groups / len(batch),
            "completion_length": sum(sum(t.assistant_mask) for t in trajs) / len(trajs),
            "truncated_turn_frac": sum(t.truncated_turns for t in trajs) / max(1, sum(t.turns for t in trajs)),
            "grad_norm": float(grad_norm),
            "skipped_steps": skipped,
            "gen_tokens_per_s": gen_stats["gen_tokens_per_s"],
            "tool_calls": gen_stats["tool_calls"],
            "tool_success_rate": 1 - gen_stats["tool_errors"] / gen_stats["tool_calls"] if gen_stats["tool_calls"] else float("nan"),
            "update_tokens_per_s": n_tokens * cfg.num_iterations / max(update_s, 1e-9),
            "step_seconds": time.perf_counter() - t0,
            **stats,
        }
        history.append(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}")
        if on_step:
            on_step(step + 1, row)
        if checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint.save(checkpoint_dir, step + 1, model, opt,
                            {"order": order, "history": history, "skipped": skipped}, run_config)
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return model, history
