"""The GRPO objective: group-relative advantages, the clipped surrogate and the k3 KL.

Notation per token t of sequence i: ratio r = exp(logp - logp_old), advantage A_i,
per-token loss l = -min(r A, clip(r, 1-eps, 1+eps_high) A) + beta * KL,
KL = r * KL_k3 with ``bias_correction_kl`` (TRL's ``use_bias_correction_kl``, its default: the
unbiased reverse-KL gradient), else KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
non-negative estimator). Log-probs are those of the sampling distribution: logits / temperature.

The loss equals TRL 1.16's ``GRPOTrainer._compute_loss`` on the same tensors, for every loss type,
both importance-sampling levels, with and without the KL and its bias correction
(tests/test_objective.py calls TRL's own function to check the loss and its gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from grpo.models import prompt_cache


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, leave_one_out: bool = False
):
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


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int = 1,
    entropy: bool = False,
    temperature: float = 1.0,
    prompt_lens: list[int] | None = None,
    prefix_model=None,
):
    """Log-probability of each token from position ``start`` on, given its prefix, under the
    distribution sampled at ``temperature`` (logits / temperature, as TRL does); shape (B, T-start),
    aligned to ``input_ids[:, start:]``. Logits (the vocabulary projection is a fifth of the
    model's compute) are computed only for the positions that predict those tokens. With
    ``entropy``, also returns the entropy of each of those next-token distributions (no gradient),
    as a second tensor of the same shape.

    With ``prompt_lens`` (each row's tokens before its first scored token, all >= ``start``), rows
    whose prompts are the same tokens share one forward of the prompt (:func:`shared_prompt_logprobs`);
    the positions before a row's prompt end, and its right padding, then get log-prob 0 (both are
    outside the loss mask).
    ``prefix_model`` runs that prompt forward (the bare module under DDP, which sees one forward)."""
    if prompt_lens is not None and min(prompt_lens) > 1:
        # each distinct prompt but its last token, and which of them each row has
        prompts: dict[tuple, int] = {}
        index = [prompts.setdefault(tuple(r[: n - 1].tolist()), len(prompts)) for r, n in zip(input_ids, prompt_lens)]
        if len(prompts) < len(index):
            return shared_prompt_logprobs(
                model,
                prefix_model or model,
                input_ids,
                attention_mask,
                start,
                list(prompts),
                index,
                entropy,
                temperature,
            )
    keep = input_ids.shape[1] - start + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]
    return _scored(logits, input_ids[:, start:], entropy, temperature)


def _scored(logits: torch.Tensor, targets: torch.Tensor, entropy: bool, temperature: float):
    """Log-probs of ``targets`` under ``logits`` / ``temperature`` in fp32, and with ``entropy``
    each distribution's entropy (no gradient)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    if not entropy:
        return logp
    with torch.no_grad():
        log_dist = F.log_softmax(logits, dim=-1)
        return logp, -(log_dist.exp() * log_dist).sum(-1)


def shared_prompt_logprobs(model, prefix_model, ids, attn, start, prompts, index, entropy, temperature):
    """:func:`token_logprobs` with each distinct prompt of ``prompts`` (all its tokens but the last)
    forwarded once, its KV cache copied to the rows that have it (row i has ``prompts[index[i]]``),
    and only the rest of each row forwarded on top.

    The rows of a GRPO group all start from the same prompt, which on the default settings is most
    of each row (first prompts pad to 164 tokens, bench/generate.py; a turn samples up to 32).
    Gradients flow through the copied cache into the one prompt forward, so the loss and its
    gradient equal the padded batch's up to float rounding (tests/test_objective.py). Neither
    transformers nor TRL forwards shared prompts once in training (grpo/models.py ``prompt_cache``)."""
    cache, p_mask = prompt_cache(prefix_model, prompts, index, ids.device)
    # each row from its prompt's last token to its own end, right-padded to the longest such rest
    # (not to the batch's width: rows with shorter prompts would carry the difference as padding);
    # its positions continue the prompt's
    cut = [len(prompts[u]) for u in index]
    ends = [int(a.nonzero()[-1]) + 1 for a in attn]
    width_s = max(e - c for e, c in zip(ends, cut, strict=True))
    s_ids = torch.zeros((len(ids), width_s), dtype=ids.dtype, device=ids.device)  # padding is masked out
    s_mask = torch.zeros_like(s_ids)
    for i, (c, e) in enumerate(zip(cut, ends, strict=True)):
        s_ids[i, : e - c] = ids[i, c:e]
        s_mask[i, : e - c] = attn[i, c:e]
    s_pos = torch.tensor(cut, device=ids.device).unsqueeze(1) + torch.arange(width_s, device=ids.device)
    logits = model(
        input_ids=s_ids,
        attention_mask=torch.cat([p_mask, s_mask], dim=1),
        position_ids=s_pos,
        past_key_values=cache,
    ).logits[:, :-1]
    out = _scored(logits, s_ids[:, 1:], entropy, temperature)
    # back to token_logprobs' layout: row i's scored column j is token c_i + 1 + j; the columns
    # before its prompt's end and after its own end (padding) get 0
    total = ids.shape[1]
    layout = [(c + 1 - start, e - c - 1, total - e) for c, e in zip(cut, ends, strict=True)]

    def place(x):
        return torch.stack([F.pad(x[i, :n], (lead, tail)) for i, (lead, n, tail) in enumerate(layout)])

    return tuple(place(x) for x in out) if entropy else place(out)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def turn_returns(prefix_rewards: list[float], gamma: float) -> list[float]:
    """Per-turn credit for one episode. ``prefix_rewards[k]`` is the reward of the conversation cut
    after agent turn k; turn k's own reward is what it added, r_k = R_k - R_{k-1} (R_{-1} = 0),
    and its return is the discounted sum of what it and later turns added,
    G_k = sum_{j>=k} gamma^(j-k) r_j. With gamma = 1, G_0 is the whole episode's reward."""
    increments = [r - (prefix_rewards[k - 1] if k else 0.0) for k, r in enumerate(prefix_rewards)]
    out, running = [], 0.0
    for r in reversed(increments):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def turn_advantages(returns: list[list[float]], group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages of per-turn returns. A first turn's return is close to the whole
    reward and a later turn's only what it added, so each turn index has its own baseline and
    scale: within each group, the k-th turn's return of every episode that reached turn k is
    centred on their mean and divided by their std (``group``), by the std of all k-th turns in the
    batch (``batch``) or not at all (``none``). Identical episodes get 0; so does a turn only one
    episode of its group reached. Returns ``(advantages as lists per episode, zero_std_groups)``,
    a group counting as zero-std when no turn index varies in it."""

    def at_turn(episodes: list[list[float]], k: int) -> torch.Tensor:
        return torch.tensor([ep[k] for ep in episodes if len(ep) > k])

    turns = max((len(ep) for ep in returns), default=0)
    batch_std = [at_turn(returns, k).std() if len(at_turn(returns, k)) > 1 else torch.tensor(0.0) for k in range(turns)]
    out, zero = [], 0
    for first in range(0, len(returns), group_size):
        group = returns[first : first + group_size]
        advs = [[0.0] * len(ep) for ep in group]
        varied = False
        for k in range(max(len(ep) for ep in group)):
            values = at_turn(group, k)
            std = values.std() if len(values) > 1 else torch.tensor(0.0)
            if std < 1e-8:
                continue
            varied = True
            denom = {"group": std + eps, "batch": batch_std[k] + eps, "none": torch.tensor(1.0)}[scale]
            mean = values.mean()
            for i, ep in enumerate(group):
                if len(ep) > k:
                    advs[i][k] = float((ep[k] - mean) / denom)
        zero += not varied
        out += advs
    return out, zero


def per_token_loss(
    logp,
    old_logp,
    advantages,
    epsilon: float,
    epsilon_high: float,
    ref_logp=None,
    beta: float = 0.0,
    mask=None,
    level: str = "token",
    bias_correction_kl: bool = True,
    sampler_weight: torch.Tensor | None = None,
):
    """Per-token clipped-surrogate loss plus ``beta`` * KL (k3, times the ratio with
    ``bias_correction_kl``); also returns the per-token KL and the clip masks.
    ``advantages`` is one per sequence (B,) or one per token (B, T) (per-turn credit).

    ``level="sequence"`` is GSPO: one importance ratio per sequence,
    exp(mean over its masked tokens of (logp - old_logp)), clipped as a whole and shared by
    every token of the sequence (needs ``mask``).

    ``sampler_weight`` (:func:`sampler_ratio`) multiplies the clipped-surrogate term, not the KL."""
    log_ratio = logp - old_logp
    if level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(1) / m.sum(1).clamp(min=1)).unsqueeze(1).expand_as(logp)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be token|sequence, got {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # per sequence, or per token
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    loss = -torch.min(unclipped, clipped)
    if sampler_weight is not None:
        loss = loss * sampler_weight
    kl = None
    if beta > 0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if bias_correction_kl:  # the ratio carries gradient even where it equals 1 (on-policy)
            kl = kl * ratio
        loss = loss + beta * kl
    clip_low = (ratio < 1 - epsilon) & (adv < 0)
    clip_high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, kl, clip_low, clip_high


def sampler_ratio(
    logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str, low: float | None, high: float | None
) -> torch.Tensor | None:
    """TRL's correction for a sampler whose numerics are not the trained model's (its vLLM importance
    sampling, grpo_trainer.py): the ratio of the (old) policy's probability of each sampled token to
    the sampler's, per token (B, T) or, for ``sequence_*`` modes, per sequence (B, 1) as the exp of
    the sum of its tokens' log differences; ``*_truncate`` clips it to [``low``, ``high``],
    ``*_mask`` sets it to 0 outside. None for mode ``none``."""
    if mode == "none":
        return None
    diff = (logp - sampler_logp) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high) if low is not None or high is not None else ratio
    outside = (ratio < (low if low is not None else -math.inf)) | (ratio > (high if high is not None else math.inf))
    return ratio.masked_fill(outside, 0.0)


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    n_seqs: int,
    n_tokens: int,
    max_completion_len: int,
    n_micro: int = 1,
) -> torch.Tensor:
    """Reduce per-token losses of one of ``n_micro`` micro-batches to its share of the batch loss,
    with TRL's formulas (its gradient accumulation steps are our micro-batches):

    * ``grpo``:    mean over sequences of (mean over each sequence's tokens)
    * ``bnpo``:    sum over the micro-batch's tokens / its own token count, / ``n_micro``
    * ``dapo``:    sum over all tokens / number of tokens in the whole batch
    * ``dr_grpo``: sum over all tokens / (sequences in the batch * max completion length)

    ``n_seqs`` and ``n_tokens`` are whole-batch counts. For ``grpo`` and ``dr_grpo`` TRL divides a
    micro-batch's mean by ``n_micro``; dividing its sum by ``n_seqs`` is the same when the
    micro-batches are equally long, and the batch mean when the last one is shorter.
    """
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if loss_type == "bnpo":
        return (loss * mask).sum() / mask.sum().clamp(min=1) / n_micro
    if loss_type == "dapo":
        return (loss * mask).sum() / max(n_tokens, 1)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (n_seqs * max_completion_len)
    raise ValueError(f"loss_type must be grpo|bnpo|dr_grpo|dapo, got {loss_type!r}")
