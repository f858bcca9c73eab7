import numpy as np
import pytest
import torch

from grpo.config import GRPOConfig, RolloutConfig
from grpo.models import MergedSampler, tiny_causal_lm
from grpo.objective import token_logprobs
from grpo.rollout import ConversationEnvironment
from grpo.scenarios import Scenario
from grpo.trainer import add_lora, train

SCEN = [
    Scenario(id=f"s{i}", domain="sales", persona="p", goal="g", opening=f"Question {i}?", followups=["More?"])
    for i in range(3)
]


def last_reply_length(convs, scen):
    """A reward that varies: the length of each conversation's last reply."""
    raw = np.array([len(c[-1]["content"]) for c in convs], dtype=float)
    return raw, {"length": raw}


class Killed(Exception):
    """Stands for a kill: raised from on_step, after the step's checkpoint is written."""


def kill_at(step: int):
    def on_step(s, row):
        if s == step:
            raise Killed

    return on_step


def test_config_rejects_unknown_and_invalid_params():
    with pytest.raises(ValueError, match="bogus"):
        GRPOConfig(bogus=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="GSPO"):
        GRPOConfig(turn_credit=True, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="native-only"):
        GRPOConfig(backend="trl", leave_one_out=True)


def test_reference_is_the_base_with_adapter_disabled(tiny_model):
    x = torch.tensor([[1, 5, 9, 14, 2]])
    attn = torch.ones_like(x)
    base = token_logprobs(tiny_model, x, attn).detach()
    peft = add_lora(tiny_model, GRPOConfig(lora_r=4))
    for n, p in peft.named_parameters():  # move the adapter away from its zero init
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    assert not torch.allclose(token_logprobs(peft, x, attn), base)
    with peft.disable_adapter():
        assert torch.allclose(token_logprobs(peft, x, attn), base)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_update_runs_in_bf16_autocast_only_when_asked(tokenizer, bf16):
    """train_policy.bf16: the update's matmuls (reference, loss forward and backward) in bf16 under
    autocast, the rollouts and the trained adapter in fp32; false keeps every matmul fp32."""
    model = tiny_causal_lm(tokenizer)
    seen = {"rollout": set(), "update": set()}  # the rollouts run in eval mode, the update in train mode
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen["update" if m.training else "rollout"].add(o.dtype)
    )
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4, bf16=False))
    cfg = GRPOConfig(steps=1, scenarios_per_step=2, group_size=2, beta=0.1, lora_r=4, bf16=bf16)
    peft, history = train(model, tokenizer, SCEN, last_reply_length, env, cfg)
    assert seen["rollout"] == {torch.float32}
    assert seen["update"] == {torch.bfloat16 if bf16 else torch.float32}
    assert np.isfinite(history[0]["loss"]) and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {p.dtype for n, p in peft.named_parameters() if "lora_" in n} == {torch.float32}


def test_the_merged_sampler_follows_the_adapters_and_leaves_the_policy_alone(tokenizer):
    model = tiny_causal_lm(tokenizer)
    x = torch.tensor([[1, 5, 9, 14, 2]])
    base = model(x).logits.detach()
    peft = add_lora(model, GRPOConfig(lora_r=4))
    sampler = MergedSampler(peft, torch.float32)
    for n, p in peft.named_parameters():  # an update moves the adapter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    trained = peft(x).logits.detach()
    assert torch.allclose(sampler.model(x).logits, base, atol=1e-5)  # merged before the update
    sampler.sync()
    assert torch.allclose(sampler.model(x).logits, trained, atol=1e-5)
    with peft.disable_adapter():
        assert torch.equal(peft(x).logits, base)  # the policy's own weights are untouched
    assert MergedSampler(peft).model.dtype == torch.bfloat16


def test_bf16_rollouts_come_from_the_merged_copy_and_the_loss_corrects_for_it(tokenizer):
    """rollout.bf16: episodes are sampled by a bf16 copy of the policy with its adapters merged
    (re-merged at each step); the update stays as configured (fp32 here) and logs how far the
    sampler's log-probs are from its own and the mean correction weight."""
    model = tiny_causal_lm(tokenizer)
    seen = {"rollout": set(), "update": set()}
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen["update" if m.training else "rollout"].add(o.dtype)
    )
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=4, bf16=True))
    generated_by = []
    generate = env.generate

    def spy(gen_model, *args, **kwargs):
        generated_by.append(next(gen_model.parameters()).dtype)
        return generate(gen_model, *args, **kwargs)

    env.generate = spy
    cfg = GRPOConfig(steps=2, scenarios_per_step=2, group_size=2, beta=0.1, lora_r=4, bf16=False, learning_rate=0.05)
    peft, history = train(model, tokenizer, SCEN, last_reply_length, env, cfg)
    assert generated_by and set(generated_by) == {torch.bfloat16}
    assert seen == {"rollout": set(), "update": {torch.float32}}  # the trained model itself never generated
    for row in history:
        assert 0 < row["sampler_logp_diff"] < 1 and row["sampler_ratio"] > 0 and np.isfinite(row["loss"])
    assert {p.dtype for p in peft.parameters()} == {torch.float32}


def test_training_runs_and_only_the_adapter_changes(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=6))
    frozen = {n: p.clone() for n, p in tiny_model.named_parameters()}

    def reward(convs, scen):  # longer first replies pay: a learnable, non-constant signal
        raw = np.array([len(c[2]["content"]) for c in convs], dtype=float)
        return raw, {"length": raw}

    cfg = GRPOConfig(
        steps=3, scenarios_per_step=2, group_size=3, beta=0.1, num_iterations=2, micro_batch_size=4, lora_r=4
    )
    rows = []
    model, history = train(tiny_model, tokenizer, SCEN, reward, env, cfg, on_step=lambda s, r: rows.append(s))
    assert rows == [1, 2, 3] and len(history) == 3
    h = history[-1]
    for key in (
        "reward_mean",
        "reward/length",
        "kl",
        "clip_low",
        "clip_high",
        "advantage_std",
        "zero_std_group_frac",
        "completion_length",
        "gen_tokens_per_s",
        "update_tokens_per_s",
        "loss",
    ):
        assert key in h and np.isfinite(h[key]), key
    assert any(r["kl"] > 0 for r in history[1:])  # the adapter moved away from the reference
    merged = model.merge_and_unload()
    for n, _ in merged.named_parameters():
        assert n in frozen
    assert any(not torch.equal(p, frozen[n]) for n, p in merged.named_parameters())


def test_non_finite_reward_aborts(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4))

    def reward(convs, scen):
        return np.full(len(convs), np.nan), {}

    with pytest.raises(FloatingPointError):
        train(
            tiny_model, tokenizer, SCEN, reward, env, GRPOConfig(steps=1, scenarios_per_step=1, group_size=2, lora_r=2)
        )


def test_killed_run_resumes_from_its_checkpoint_and_ends_identical(tokenizer, tmp_path):

    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=5))

    reward = last_reply_length

    cfg = GRPOConfig(
        steps=4,
        scenarios_per_step=1,
        group_size=3,
        lora_r=2,
        checkpoint_every=2,
        learning_rate=1e-2,
        lr_scheduler_type="linear",  # its state must come back too
        weight_decay=0.1,
    )
    full, _ = train(tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, checkpoint_dir=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # removed once training completes

    ckpt = tmp_path / "b"
    with pytest.raises(Killed):
        train(
            tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, on_step=kill_at(3), checkpoint_dir=str(ckpt)
        )
    saved = torch.load(ckpt / "checkpoint.pt", weights_only=True)  # no pickle needed
    assert saved["step"] == 2 and saved["optimizer"]["state"]
    steps = []
    resumed, history = train(
        tiny_causal_lm(tokenizer),
        tokenizer,
        SCEN,
        reward,
        env,
        cfg,
        on_step=lambda s, r: steps.append(s),
        checkpoint_dir=str(ckpt),
    )
    assert steps == [3, 4] and [r["step"] for r in history] == [1, 2, 3, 4]
    a, b = full.state_dict(), resumed.state_dict()
    lora = [k for k in a if "lora_" in k]
    assert lora and all(torch.allclose(a[k], b[k], atol=1e-6) for k in lora)


def test_a_changed_rollout_or_fingerprint_does_not_resume_a_checkpoint(tokenizer, tmp_path):
    """The checkpoint names its run: config, scenarios, rollout settings and the caller's
    fingerprint (the stage's: reward settings, calibration, reward and base model hashes)."""

    reward = last_reply_length

    cfg = GRPOConfig(steps=2, scenarios_per_step=1, group_size=2, lora_r=2, checkpoint_every=1)
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4))
    ckpt = str(tmp_path / "ckpt")
    for changed_env, fingerprint in [
        (ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4, temperature=0.5)), {"a": 1}),
        (env, {"a": 2}),
    ]:
        with pytest.raises(Killed):
            train(tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, kill_at(2), ckpt, {"a": 1})
        steps = []
        train(
            tiny_causal_lm(tokenizer),
            tokenizer,
            SCEN,
            reward,
            changed_env,
            cfg,
            lambda s, r, seen=steps: seen.append(s),
            ckpt,
            fingerprint,
        )
        assert steps == [1, 2]


def test_config_warns_about_gspo_settings_that_do_not_do_what_they_say():
    assert GRPOConfig().warnings() == []
    warned = GRPOConfig(importance_sampling_level="sequence", loss_type="dapo").warnings()
    assert len(warned) == 2 and "loss_type dapo" in warned[0] and "3e-4" in warned[1]
    assert GRPOConfig(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4).warnings() == []


def test_checkpoint_of_another_configuration_is_not_resumed(tokenizer, tmp_path):
    from grpo import checkpoint

    model = add_lora(tiny_causal_lm(tokenizer), GRPOConfig(lora_r=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    checkpoint.save(tmp_path, 2, model, opt, {"order": []}, {"lr": 1})
    assert checkpoint.load(tmp_path, model, opt, {"lr": 2}) is None
    assert checkpoint.load(tmp_path, model, opt, {"lr": 1})[0] == 2


def test_grpo_learns_a_trivially_learnable_reward(tokenizer):
    """Reward: the share of words in the reply that start with a capital letter. The tiny model gets
    a large initializer range, so its logits are not nearly uniform and a LoRA can move them."""

    model = tiny_causal_lm(tokenizer, seed=3, initializer_range=0.5)
    # fp32 rollouts on every machine (rollout.bf16 auto would pick bf16 on some: another random stream)
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=8, bf16=False))
    scen = [
        Scenario(id=f"t{i}", domain="sales", persona="p", goal="g", opening=f"Say something {i}.") for i in range(4)
    ]

    def reward(convs, s):
        words = [c[-1]["content"].split() for c in convs]
        share = np.array([sum(w[:1].isupper() for w in ws) / max(1, len(ws)) for ws in words])
        return share, {"capitalised": share}

    cfg = GRPOConfig(
        steps=36,
        scenarios_per_step=4,
        group_size=8,
        learning_rate=2e-2,
        lora_r=8,
        lora_alpha=16,
        beta=0.0,
        micro_batch_size=32,
        seed=0,
    )
    rows = []
    train(model, tokenizer, scen, reward, env, cfg, on_step=lambda step, row: rows.append(row["reward_mean"]))
    first, last = np.mean(rows[:6]), np.mean(rows[-6:])
    assert last > first + 0.12, (first, last)


def test_trl_backend_runs_our_multi_turn_episodes_and_logs_the_native_metric_names(tokenizer, tiny_model, monkeypatch):
    from trl import GRPOTrainer

    from grpo.trl_backend import train_trl

    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=4))
    seen, masks = [], []

    def reward(convs, scen):
        seen.append((scen.id, [[m["role"] for m in c] for c in convs]))
        raw = np.array([len(c[-1]["content"]) for c in convs], dtype=float)
        return raw, {"length": raw}

    compute_loss = GRPOTrainer._compute_loss

    def spy(self, model, inputs):  # what TRL's loss is masked with
        masks.append((inputs["completion_mask"] * inputs["tool_mask"], inputs["completion_ids"]))
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    cfg = GRPOConfig(steps=2, scenarios_per_step=2, group_size=2, lora_r=2, beta=0.1, backend="trl", learning_rate=1e-2)
    peft, rows = train_trl(tiny_model, tokenizer, SCEN, reward, env, cfg, "cpu")
    assert len(rows) == 2 and len(seen) == 4
    for _, roles in seen:  # each scenario's group of 2 scored together, on whole two-turn episodes
        assert roles == [["system", "user", "assistant", "user", "assistant"]] * 2
    mask, ids = masks[0]
    user_turn = tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]
    for m, row in zip(
        mask.tolist(), ids.tolist(), strict=True
    ):  # the follow-up's tokens sit in the completion, masked out
        k = next(i for i in range(len(row)) if row[i : i + len(user_turn)] == user_turn)
        assert not any(m[k : k + len(user_turn)]) and any(m[:k]) and any(m[k:])
    names = {
        "reward_mean",
        "reward_std",
        "reward/length",
        "advantage_std",
        "zero_std_group_frac",
        "kl",
        "clip_low",
        "clip_high",
        "entropy",
        "loss",
        "grad_norm",
        "completion_length",
        "truncated_turn_frac",
        "gen_tokens_per_s",
        "tool_calls",
        "tool_success_rate",
        "update_tokens_per_s",
        "step_seconds",
        "step",
    }

    native_cfg = GRPOConfig(steps=1, scenarios_per_step=2, group_size=2, lora_r=2)
    _, native_rows = train(tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, native_cfg)
    # the native backend's own: skipped updates, and the bf16 sampler's figures where rollout.bf16 is on
    assert set(rows[0]) == names == set(native_rows[0]) - {"skipped_steps", "sampler_logp_diff", "sampler_ratio"}
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft.named_parameters())


def test_trl_backend_resumes_a_killed_run_from_its_checkpoint(tokenizer, tmp_path):
    from grpo.trl_backend import train_trl

    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=1, max_new_tokens=4))

    reward = last_reply_length

    cfg = GRPOConfig(steps=3, scenarios_per_step=1, group_size=2, lora_r=2, checkpoint_every=1, backend="trl")
    with pytest.raises(Killed):
        train_trl(tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, "cpu", kill_at(2), str(tmp_path))
    assert (tmp_path / "checkpoint-1" / "optimizer.pt").exists()
    steps = []
    _, history = train_trl(
        tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, "cpu", lambda s, r: steps.append(s), str(tmp_path)
    )
    assert steps == [2, 3] and [r["step"] for r in history] == [1, 2, 3]
    with pytest.raises(Killed):  # killed again; then a run with other settings starts from scratch
        train_trl(tiny_causal_lm(tokenizer), tokenizer, SCEN, reward, env, cfg, "cpu", kill_at(2), str(tmp_path))
    steps = []
    other = {"sha256.calibration": "another"}
    train_trl(
        tiny_causal_lm(tokenizer),
        tokenizer,
        SCEN,
        reward,
        env,
        cfg,
        "cpu",
        lambda s, r: steps.append(s),
        str(tmp_path),
        other,
    )
    assert steps == [1, 2, 3]
    assert not tmp_path.exists()  # removed once training completes


def test_turn_credit_maps_each_turn_advantage_onto_its_tokens(tokenizer, tiny_model):
    from grpo.trainer import cut_after_turn, pad_batch, token_advantages

    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=4))
    torch.manual_seed(0)
    trajs = env.rollout(tiny_model, SCEN[:1], 2)
    ids, _, mask, start = pad_batch(trajs, tokenizer.pad_token_id, "cpu")
    per_turn = [[1.0, -2.0], [3.0, 4.0]]
    tok = token_advantages(trajs, per_turn, ids.shape[1], start, "cpu")
    for i in range(2):
        runs, prev = [], 0  # lengths of the masked runs: one per agent turn
        for m in mask[i].tolist():
            if m and not prev:
                runs.append(0)
            if m:
                runs[-1] += 1
            prev = m
        assert len(runs) == 2
        assert tok[i][mask[i].bool()].tolist() == [per_turn[i][0]] * runs[0] + [per_turn[i][1]] * runs[1]
        assert torch.all(tok[i][~mask[i].bool()] == 0)
    assert [m["role"] for m in cut_after_turn(trajs[0].messages, 1)] == ["system", "user", "assistant"]

    def reward(convs, scen):  # later turns add length: per-turn credit has something to split
        raw = np.array([sum(len(m["content"]) for m in c if m["role"] == "assistant") for c in convs], dtype=float)
        return raw, {"length": raw}

    cfg = GRPOConfig(steps=2, scenarios_per_step=2, group_size=3, lora_r=2, turn_credit=True, turn_gamma=0.5)
    _, rows = train(tiny_model, tokenizer, SCEN, reward, env, cfg)
    assert len(rows) == 2 and rows[-1]["advantage_std"] > 0
