import math

import pytest
import torch

from grpo.objective import (
    aggregate,
    group_advantages,
    k3_kl,
    per_token_loss,
    sampler_ratio,
    turn_advantages,
    turn_returns,
)


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    adv, zero = group_advantages(r, 2, "group", eps=0.0)
    s = torch.tensor([1.0, 3.0]).std().item()  # unbiased, as TRL
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0])
    assert zero == 1  # the second group has zero std: counted, contributes nothing


def test_group_advantages_batch_and_none_scaling():
    r = torch.tensor([0.0, 2.0, 4.0, 8.0])
    none, _ = group_advantages(r, 2, "none")
    assert none.tolist() == [-1.0, 1.0, -2.0, 2.0]
    batch, _ = group_advantages(r, 2, "batch", eps=0.0)
    assert batch.tolist() == pytest.approx((none / r.std()).tolist())
    with pytest.raises(ValueError):
        group_advantages(r, 2, "bogus")


def test_k3_kl_is_zero_at_equality_and_matches_formula():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5])
    kl = k3_kl(logp, ref)
    assert kl[0] == 0 and kl[1].item() == pytest.approx(math.exp(0.5) - 0.5 - 1)


def test_clipping_on_both_sides():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))  # ratios
    pos = per_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    # positive advantage: ratio 1.5 clipped to 1.28, ratio 0.5 not clipped (min takes 0.5)
    assert pos[0][0].tolist() == pytest.approx([-1.28, -0.5, -1.1, -0.9])
    assert pos[3].tolist() == [[True, False, False, False]] and not pos[2].any()
    neg = per_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.28)
    # negative advantage: -min(-r, -clip(r)) = max(r, clip(r)): 0.5 -> 0.8 is the clipped-low case
    assert neg[0][0].tolist() == pytest.approx([1.5, 0.8, 1.1, 0.9])
    assert neg[2].tolist() == [[False, True, False, False]] and not neg[3].any()


def test_kl_term_adds_beta_times_k3():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    base, _, _, _ = per_token_loss(logp, logp.detach(), torch.tensor([0.0]), 0.2, 0.2)
    with_kl, kl, _, _ = per_token_loss(logp, logp.detach(), torch.tensor([0.0]), 0.2, 0.2, ref, beta=0.1)
    assert torch.allclose(with_kl - base, 0.1 * k3_kl(logp, ref))


def test_aggregation_formulas():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "grpo", 2, 4, 5).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(loss, mask, "bnpo", 2, 4, 5).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "dapo", 2, 4, 5).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "dr_grpo", 2, 4, 5).item() == pytest.approx(10 / (2 * 5))
    # micro-batches sum to the whole-batch loss, except bnpo: each by its own token count, as TRL
    parts = sum(aggregate(loss[i : i + 1], mask[i : i + 1], "grpo", 2, 4, 5) for i in range(2))
    assert parts.item() == pytest.approx(3.0)
    bnpo = sum(aggregate(loss[i : i + 1], mask[i : i + 1], "bnpo", 2, 4, 5, n_micro=2) for i in range(2))
    assert bnpo.item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "nope", 2, 4, 5)


class StubTRL:
    """Just what TRL 1.16's ``GRPOTrainer._compute_loss`` reads, so that its own code computes the
    loss on our tensors (per-token log-probs are handed in instead of computed by a model)."""

    def __init__(self, logp, loss_type, level, beta, bias_correction, accumulation, max_len):
        from types import SimpleNamespace

        self.logp = logp
        self.loss_type, self.importance_sampling_level, self.beta = loss_type, level, beta
        self.epsilon_low, self.epsilon_high = 0.2, 0.28
        self.args = SimpleNamespace(
            use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=accumulation
        )
        self.current_gradient_accumulation_steps, self.max_completion_length = accumulation, max_len
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm = self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
        from collections import defaultdict

        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **_):
        return self.logp, torch.zeros_like(self.logp), None


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.1, True), (0.1, False)])
@pytest.mark.parametrize("sampler", [False, True])
def test_loss_and_gradient_equal_trls_own_compute_loss(loss_type, level, beta, bias_correction, sampler):
    """Two micro-batches (TRL: two accumulation steps) of the same tensors through TRL's function
    and ours: the losses and the gradients with respect to the log-probs match. With ``sampler``,
    the tokens came from a sampler that is not the trained model (TRL: vLLM), and the correction
    weights the loss as TRL's does."""
    from trl import GRPOTrainer

    torch.manual_seed(0)
    B, T, max_len = 3, 5, 6
    logp_all = (-torch.rand(2 * B, T) * 3).requires_grad_()
    old = logp_all.detach() + 0.3 * torch.randn(2 * B, T)  # ratios away from 1: clipping happens
    ref = logp_all.detach() + 0.5 * torch.randn(2 * B, T)
    adv = torch.randn(2 * B)
    mask = (torch.rand(2 * B, T) > 0.3).long()
    mask[:, 0] = 1
    n_tokens = int(mask.sum())
    ours = theirs = 0.0
    sampled = old + 0.4 * torch.randn(2 * B, T)
    for part in (slice(0, B), slice(B, 2 * B)):
        weight = sampler_ratio(old[part], sampled[part], mask[part], "sequence_mask", None, 3.0) if sampler else None
        loss_tok, *_ = per_token_loss(
            logp_all[part],
            old[part],
            adv[part],
            0.2,
            0.28,
            ref[part],
            beta,
            mask[part],
            level,
            bias_correction,
            weight,
        )
        ours = ours + aggregate(loss_tok, mask[part], loss_type, 2 * B, n_tokens, max_len, n_micro=2)
        stub = StubTRL(logp_all[part], loss_type, level, beta, bias_correction, 2, max_len)
        inputs = {
            "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
            "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long),
            "completion_mask": mask[part],
            "advantages": adv[part],
            "old_per_token_logps": old[part],
            "ref_per_token_logps": ref[part],
            "num_items_in_batch": torch.tensor(float(n_tokens)),
        }
        if sampler:
            stub.use_vllm = stub.vllm_importance_sampling_correction = True
            inputs["importance_sampling_ratio"] = weight
        theirs = theirs + GRPOTrainer._compute_loss(stub, None, inputs)
    (grad_ours,) = torch.autograd.grad(ours, logp_all, retain_graph=True)
    (grad_theirs,) = torch.autograd.grad(theirs, logp_all)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)


def test_sampler_ratio_modes_match_trls_formulas():
    """TRL's vLLM correction modes on hand-computed numbers: the ratio of the policy's to the
    sampler's probability, per token or per sequence (the exp of the sum), clipped or masked."""
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -5.0]])
    sampled = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the last column is padding: its difference never counts
    e = math.e
    token = sampler_ratio(logp, sampled, mask, "token_truncate", None, None)
    assert torch.allclose(token, torch.tensor([[e**0.5, e**-1, 1.0], [e, 1.0, 1.0]]))
    assert torch.allclose(
        sampler_ratio(logp, sampled, mask, "token_truncate", 0.5, 2.0), torch.tensor([[e**0.5, 0.5, 1], [2, 1, 1]])
    )
    assert torch.allclose(
        sampler_ratio(logp, sampled, mask, "token_mask", 0.5, 2.0), torch.tensor([[e**0.5, 0, 1], [0, 1, 1]])
    )
    seq = sampler_ratio(logp, sampled, mask, "sequence_truncate", None, 2.0)
    assert seq.shape == (2, 1) and torch.allclose(seq, torch.tensor([[e**-0.5], [2.0]]))
    assert torch.allclose(
        sampler_ratio(logp, sampled, mask, "sequence_mask", None, 2.0), torch.tensor([[e**-0.5], [0]])
    )
    assert sampler_ratio(logp, sampled, mask, "none", None, 3.0) is None


def test_log_probs_are_the_sampling_distributions_at_the_temperature(tiny_model):
    """At T != 1 the log-prob the trainer gives a sampled token is the one the sampler drew it with
    (generate's scores are its logits after the temperature; top-k and top-p off)."""
    from grpo.objective import token_logprobs

    torch.manual_seed(0)
    prompt = torch.tensor([[1, 5, 9, 14]])
    out = tiny_model.generate(
        prompt, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    new = out.sequences[0, prompt.shape[1] :]
    sampled = torch.stack([s[0].log_softmax(-1)[t] for s, t in zip(out.scores, new, strict=True)])
    attn = torch.ones_like(out.sequences)
    ours = token_logprobs(tiny_model, out.sequences, attn, start=prompt.shape[1], temperature=0.7)[0]
    assert torch.allclose(ours, sampled, atol=1e-5)
    raw = token_logprobs(tiny_model, out.sequences, attn, start=prompt.shape[1])[0]
    assert (raw - sampled).abs().max() > 1e-3  # what the trainer used to score: another distribution


def test_token_logprobs_from_start_equal_the_full_computation(tiny_model):
    from grpo.objective import token_logprobs

    ids = torch.tensor([[1, 5, 9, 14, 2, 7], [1, 6, 8, 3, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    full = token_logprobs(tiny_model, ids, attn)
    logits = tiny_model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)
    assert torch.allclose(full, logits[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2), atol=1e-5)
    assert torch.allclose(token_logprobs(tiny_model, ids, attn, start=3), full[:, 2:], atol=1e-5)


def test_rows_that_share_a_prompt_forward_it_once_with_the_same_logprobs_and_gradient(tiny_model):
    """Two groups of rows (prompts of 5 and 3 tokens, then sampled tokens of different lengths,
    right-padded): the shared-prompt path forwards each prompt once and gives the padded batch's
    log-probs, entropies and LoRA gradients."""
    from peft import get_peft_model

    from grpo.models import lora_config
    from grpo.objective import token_logprobs

    torch.manual_seed(0)
    model = get_peft_model(tiny_model, lora_config(4, 8))
    for p in model.parameters():  # LoRA's B starts at 0; move it so the adapter changes the forward
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    a, b = [1, 5, 9, 14, 3], [1, 6, 8]
    rows = [a + [7, 2, 11], a + [4, 4], a + [8, 3, 2, 6], b + [9, 9, 9, 5], b + [2]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    prompts = [5, 5, 5, 3, 3]
    mask = torch.tensor([[int(p <= j < len(r)) for j in range(width)] for r, p in zip(rows, prompts, strict=True)])
    prompt_forwards = []
    hook = model.get_base_model().model.register_forward_hook(
        lambda m, i, kw, o: prompt_forwards.append(kw["input_ids"].shape), with_kwargs=True
    )

    def run(**kw):
        model.zero_grad()
        logp, ent = token_logprobs(model, ids, attn, start=3, entropy=True, temperature=0.8, **kw)
        (logp * mask[:, 3:]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logp.detach() * mask[:, 3:], ent * mask[:, 3:], grads

    plain = run()
    prompt_forwards.clear()
    shared = run(prompt_lens=prompts)
    hook.remove()
    assert prompt_forwards == [(2, 4), (5, 5)]  # 2 distinct prompts but their last token, then each row's rest
    assert torch.allclose(shared[0], plain[0], atol=1e-5)
    assert torch.allclose(shared[1], plain[1], atol=1e-5)
    assert all(torch.allclose(s, p, atol=1e-5) for s, p in zip(shared[2], plain[2], strict=True))
    assert max(g.abs().max() for g in plain[2]) > 1e-3  # the gradients compared are not all zero


def test_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 6.0])
    adv, _ = group_advantages(r, 3, "none", leave_one_out=True)
    assert adv.tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])


def test_gspo_uses_one_clipped_ratio_per_sequence():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.3, 0.0, 0.9]])
    mask = torch.tensor([[1, 1, 0]])  # the masked-out token does not enter the sequence ratio
    loss, _, lo, hi = per_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2, mask=mask, level="sequence")
    ratio = math.exp(0.15)  # mean log-ratio over the two masked tokens
    assert loss[0, :2].tolist() == pytest.approx([-ratio, -ratio])
    loss, _, lo, hi = per_token_loss(logp * 4, old, torch.tensor([1.0]), 0.2, 0.2, mask=mask, level="sequence")
    assert loss[0, :2].tolist() == pytest.approx([-1.2, -1.2]) and hi[0, :2].all()
    with pytest.raises(ValueError):
        per_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2, mask=mask, level="bogus")


def test_turn_returns_discount_what_each_turn_added():
    # prefix rewards 0.2, 0.5, 0.4 -> increments 0.2, 0.3, -0.1; gamma 0.5
    assert turn_returns([0.2, 0.5, 0.4], 0.5) == pytest.approx([0.325, 0.25, -0.1])
    assert turn_returns([0.2, 0.5, 0.4], 1.0)[0] == pytest.approx(0.4)  # gamma 1: the first turn gets the whole reward


def test_turn_advantages_centre_and_scale_each_turn_index_within_its_group():
    # group 1: turn-0 returns 1 and 3, turn-1 returns 0 and 4; group 2: identical episodes
    adv, zero = turn_advantages([[1.0, 0.0], [3.0, 4.0], [2.0, 2.0], [2.0, 2.0]], group_size=2)
    s0, s1 = torch.tensor([1.0, 3.0]).std().item(), torch.tensor([0.0, 4.0]).std().item()
    assert adv[0] == pytest.approx([-1 / (s0 + 1e-4), -2 / (s1 + 1e-4)])
    assert adv[1] == pytest.approx([1 / (s0 + 1e-4), 2 / (s1 + 1e-4)])
    assert adv[2:] == [[0.0, 0.0], [0.0, 0.0]] and zero == 1  # identical episodes: 0, counted


def test_turn_advantages_of_identical_multi_turn_episodes_are_zero():
    """One mean over all (episode, turn) returns gave these +0.94 and -0.94."""
    returns = [turn_returns([0.2, 0.5], 0.9)] * 4
    adv, zero = turn_advantages(returns, group_size=4)
    assert adv == [[0.0, 0.0]] * 4 and zero == 1
    # a turn only one episode reached has nothing to compare with: 0
    adv, _ = turn_advantages([[1.0, 0.5], [2.0]], group_size=2, scale="none")
    assert adv == [[-0.5, 0.0], [0.5]]


def test_token_level_advantages_match_sequence_level_when_constant():
    logp, old = torch.randn(2, 5), torch.randn(2, 5)
    seq = torch.tensor([0.5, -1.0])
    a = per_token_loss(logp, old, seq, 0.2, 0.28)[0]
    b = per_token_loss(logp, old, seq.unsqueeze(1).expand(2, 5), 0.2, 0.28)[0]
    assert torch.equal(a, b)
