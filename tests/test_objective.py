import math

import pytest
import torch

from grpo.objective import aggregate, group_advantages, k3_kl, per_token_loss, turn_advantages, turn_returns


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
    # micro-batches sum to the whole-batch loss
    parts = sum(aggregate(loss[i : i + 1], mask[i : i + 1], "grpo", 2, 4, 5) for i in range(2))
    assert parts.item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "nope", 2, 4, 5)


def test_token_logprobs_from_start_equal_the_full_computation(tiny_model):
    from grpo.objective import token_logprobs

    ids = torch.tensor([[1, 5, 9, 14, 2, 7], [1, 6, 8, 3, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    full = token_logprobs(tiny_model, ids, attn)
    logits = tiny_model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)
    assert torch.allclose(full, logits[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2), atol=1e-5)
    assert torch.allclose(token_logprobs(tiny_model, ids, attn, start=3), full[:, 2:], atol=1e-5)


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


def test_turn_advantages_normalise_within_groups_and_count_flat_ones():
    adv, zero = turn_advantages([[1.0, 0.0], [3.0], [2.0, 2.0], [2.0]], group_size=2)
    flat = torch.tensor([1.0, 0.0, 3.0])
    assert adv[0] + adv[1] == pytest.approx(((flat - flat.mean()) / (flat.std() + 1e-4)).tolist())
    assert adv[2:] == [[0.0, 0.0], [0.0]] and zero == 1


def test_token_level_advantages_match_sequence_level_when_constant():
    logp, old = torch.randn(2, 5), torch.randn(2, 5)
    seq = torch.tensor([0.5, -1.0])
    a = per_token_loss(logp, old, seq, 0.2, 0.28)[0]
    b = per_token_loss(logp, old, seq.unsqueeze(1).expand(2, 5), 0.2, 0.28)[0]
    assert torch.equal(a, b)
