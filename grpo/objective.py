"""The GRPO objective: group-relative advantages, the clipped surrogate and the k3 KL.

Notation per token t of sequence i: ratio r = exp(logp - logp_old), advantage A_i,
per-token loss l = -min(r A, clip(r, 1-eps, 1+eps_high) A) + beta * KL_k3,
KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     leave_one_out: bool = False):
    """(r - group mean) / std, with ``scale`` = ``group`` (per-group std), ``batch`` (one std over
    the batch) or ``none``. With ``leave_one_out`` the baseline of each completion is the mean of the
    *other* completions of its group (RLOO): r_i - mean_{j!=i} r_j = G/(G-1) * (r_i - mean).
    Returns ``(advantages, zero_std_groups)``; a group whose rewards are all equal gets advantage 0
    and is counted."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if leave_one_out:
        if group_size < 2:
            raise ValueError("leave_one_out needs group_size >= 2")
        centered = centered * group_size / (group_size - 1)
    std = grouped.std(dim=1, keepdim=True)
    if scale == "group":
        adv = centered / (std + eps)
    elif scale == "batch":
        adv = centered / (rewards.std() + eps)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"scale_rewards must be group|batch|none, got {scale!r}")
    zero = std.squeeze(1) < 1e-8
    adv[zero] = 0.0
    return adv.reshape(-1), int(zero.sum())


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Log-probability of each token from position ``start`` on, given its prefix; shape
    (B, T-start), aligned to ``input_ids[:, start:]``. Logits (the vocabulary projection is a
    fifth of the model's compute) are computed only for the positions that predict those tokens."""
    keep = input_ids.shape[1] - start + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1].float()
    return -F.cross_entropy(logits.transpose(1, 2), input_ids[:, start:], reduction="none")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(logp, old_logp, advantages, epsilon: float, epsilon_high: float,
                   ref_logp=None, beta: float = 0.0, mask=None, level: str = "token"):
    """Per-token clipped-surrogate loss plus ``beta`` * k3 KL; also returns the clip masks.

    ``level="sequence"`` is GSPO: one importance ratio per sequence,
    exp(mean over its masked tokens of (logp - old_logp)), clipped as a whole and shared by
    every token of the sequence (needs ``mask``)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(1) / m.sum(1).clamp(min=1)).unsqueeze(1).expand_as(logp)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token|sequence, got {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    kl = None
    if beta > 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    clip_low = (ratio < 1 - epsilon) & (adv < 0)
    clip_high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, kl, clip_low, clip_high


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, n_seqs: int, n_tokens: int,
              max_completion_len: int) -> torch.Tensor:
    """Reduce per-token losses of a micro-batch to its share of the batch loss (TRL's formulas).

    * ``grpo``:    mean over sequences of (mean over each sequence's tokens)
    * ``bnpo``/``dapo``: sum over all tokens / number of tokens in the whole batch
    * ``dr_grpo``: sum over all tokens / (sequences in the batch * max completion length)

    ``n_seqs`` and ``n_tokens`` are whole-batch counts, so summing micro-batch results gives the
    batch loss exactly.
    """
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if loss_type in ("bnpo", "dapo"):
        return (loss * mask).sum() / max(n_tokens, 1)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (n_seqs * max_completion_len)
    raise ValueError(f"loss_type must be grpo|bnpo|dr_grpo|dapo, got {loss_type!r}")
