"""``train_policy.backend: trl``: the same stage through TRL's GRPOTrainer, for the ecosystem path
and as a side-by-side reference for the native loop (grpo/trainer.py).

Our scenarios become TRL's dataset (conversational prompts: the system prompt with any tool
declarations, and the opening). TRL's ``rollout_func`` hook runs our multi-turn episodes
(:class:`grpo.rollout.ConversationEnvironment`: the user simulator, tool calls and results) and
hands TRL the tokens after the prompt with ``env_mask`` marking the ones the policy sampled, so
TRL's loss touches only the agent's tokens, as the native loop's does. TRL recomputes the
log-probs itself (``logprobs: None``; they are only needed for vLLM's importance correction).
Our composite reward is TRL's reward function and scores each scenario's group of conversations
together.

Both backends log the same metric names. Reward statistics, advantage std, the zero-std group
fraction, tool and generation figures come from the native loop's own helpers (``reward_metrics``,
``generation_metrics``, ``truncated_turn_frac`` in grpo/trainer.py); KL, clip fractions, entropy,
loss, grad norm and completion length are TRL's. TRL has no skip-on-non-finite-gradient guard, so
``skipped_steps`` is native-only. Per-turn credit and the leave-one-out baseline are native-only
and refused here. The LoRA adapter is the native loop's (grpo/models.py ``lora_config``).

Checkpoints are TRL's (``save_steps``: adapter, optimizer, scheduler, RNG, trainer state); a
rerun of the same run (the native loop's fingerprint, kept in ``checkpoint_dir``) resumes from the
last one, and ``checkpoint_dir`` is removed when training completes.

Under torchrun TRL's accelerate runs the ranks: DDP, or DeepSpeed ZeRO with
``distributed.strategy: deepspeed`` (the config is grpo/deepspeed/zero2.json, its "auto" values
filled in by transformers from the arguments here). Each rank gets whole groups (its share
of ``scenarios_per_step``); TRL gathers the rewards for the advantages, and only rank 0 reports
steps and writes checkpoint files of ours.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from grpo import checkpoint, distributed
from grpo.config import GRPOConfig, RolloutConfig
from grpo.io import read_json, write_json
from grpo.models import lora_config, use_bf16
from grpo.objective import group_advantages
from grpo.rollout import ConversationEnvironment
from grpo.scenarios import Scenario
from grpo.trainer import (
    check_finite,
    generation_metrics,
    log_warnings,
    reward_metrics,
    run_identity,
    truncated_turn_frac,
)

log = logging.getLogger(__name__)

HISTORY = "grpo_history.json"

# TRL log key -> the native loop's metric name
RENAME = {
    "kl": "kl",
    "entropy": "entropy",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "clip_ratio/low_mean": "clip_low",
    "clip_ratio/high_mean": "clip_high",
    "completions/mean_length": "completion_length",
}


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages])


def trl_settings(cfg: GRPOConfig, rollout: RolloutConfig, device: str) -> dict:
    """TRL ``GRPOConfig`` arguments that carry our train_policy and rollout settings: steps,
    optimiser, sampling, objective, and this rank's rows (whole groups) as TRL's batch and
    gradient accumulation (our micro-batches)."""
    batch = cfg.scenarios_per_step * cfg.group_size // distributed.world()
    accumulate = (
        batch // cfg.micro_batch_size if cfg.micro_batch_size < batch and batch % cfg.micro_batch_size == 0 else 1
    )
    return dict(
        use_cpu=device == "cpu",
        bf16=use_bf16(cfg.bf16, torch.device(device)),  # accelerate's autocast, as the native update's
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=batch // accumulate,
        gradient_accumulation_steps=accumulate,
        num_generations=cfg.group_size,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        beta=cfg.beta,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        importance_sampling_level=cfg.importance_sampling_level,
        num_iterations=cfg.num_iterations,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        gradient_checkpointing=False,  # TRL's default trades compute for memory; the native loop does not
    )


def train_trl(
    model,
    tokenizer,
    scenarios: list[Scenario],
    reward_fn: Callable,
    env: ConversationEnvironment,
    cfg: GRPOConfig,
    device: str,
    on_step: Callable[[int, dict], None] | None = None,
    checkpoint_dir: str | None = None,
    fingerprint: dict | None = None,
):
    """Train LoRA adapters with TRL's GRPOTrainer on multi-turn episodes. Returns
    ``(peft_model, history)`` like :func:`grpo.trainer.train`, whose ``fingerprint`` this takes too."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer
    from trl.models.utils import unwrap_model_for_generation

    GRPOConfig.model_validate({**cfg.model_dump(), "backend": "trl"})  # refuses the native-only options
    log_warnings(cfg)
    # rollout_func sees only the prompts, so each prompt must name one scenario
    by_prompt: dict[str, Scenario] = {}
    for s in scenarios:
        by_prompt.setdefault(prompt_key(env.first_messages(s)), s)
    if len(by_prompt) < len(scenarios):
        log.warning(
            "trl backend: %d scenario(s) share their first messages with another and are left out",
            len(scenarios) - len(by_prompt),
        )
    dataset = Dataset.from_list([{"prompt": env.first_messages(s), "scenario_id": s.id} for s in by_prompt.values()])
    by_id = {s.id: s for s in by_prompt.values()}
    step_stats: dict = {}  # filled by the rollout and the reward function, read by the logging callback

    def rollout_func(prompts, trainer):
        """One trajectory per prompt row (TRL's sampler already repeats each prompt group_size times)."""
        # TRL's own context for generating inside training: the bare model out of DDP or DeepSpeed
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as policy:
            trajs = env.rollout(policy, [by_prompt[prompt_key(p)] for p in prompts], 1)
        starts = [t.assistant_mask.index(1) for t in trajs]
        step_stats.update(
            generation_metrics(env.stats),
            truncated_turn_frac=truncated_turn_frac(trajs),
            gen_seconds=env.stats["gen_seconds"],
            agent_tokens=sum(sum(t.assistant_mask) for t in trajs),
        )
        return {
            "prompt_ids": [t.input_ids[:k] for t, k in zip(trajs, starts, strict=True)],
            "completion_ids": [t.input_ids[k:] for t, k in zip(trajs, starts, strict=True)],
            "env_mask": [t.assistant_mask[k:] for t, k in zip(trajs, starts, strict=True)],
            "logprobs": None,
            "conversation": [t.messages for t in trajs],
        }

    def composite_reward(prompts, completions, scenario_id, conversation, **_):
        """Score each scenario's conversations as one group with the composite reward."""
        out = [0.0] * len(conversation)
        components: dict[str, list[float]] = {}
        for sid in dict.fromkeys(scenario_id):
            idx = [i for i, x in enumerate(scenario_id) if x == sid]
            total, raw = reward_fn([conversation[i] for i in idx], by_id[sid])
            for i, v in zip(idx, total, strict=True):
                out[i] = float(v)
            for k, v in raw.items():
                components.setdefault(k, []).extend(np.asarray(v, dtype=float).tolist())
        # every rank's, for the log (TRL gathers them too, for its advantages)
        parts = distributed.all_gather((out, components))
        rewards = torch.tensor([r for p in parts for r in p[0]])
        merged = {k: [x for p in parts for x in p[1][k]] for k in components}
        adv, zero = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)  # TRL's formula, for the log
        step_stats.update(reward_metrics(rewards, merged, adv, zero, len(rewards) // cfg.group_size))
        return out

    history: list[dict] = []
    clock = {"t": time.perf_counter()}

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs or "reward_mean" not in step_stats:
                return
            for key in ("loss", "grad_norm"):  # TRL goes on with them; we stop before it saves
                if key in logs:
                    check_finite(torch.tensor(float(logs[key])), key, state.global_step)
            now = time.perf_counter()
            s = dict(step_stats)
            step_s = now - clock["t"]
            row = {
                "step": state.global_step,
                **{k: v for k, v in s.items() if k not in ("gen_seconds", "agent_tokens")},
                **{new: float(logs[old]) for old, new in RENAME.items() if old in logs},
                "update_tokens_per_s": s["agent_tokens"] * cfg.num_iterations / max(step_s - s["gen_seconds"], 1e-9),
                "step_seconds": step_s,
            }
            clock["t"] = now
            history.append(row)
            if on_step and distributed.is_main():
                on_step(state.global_step, row)

        def on_save(self, args, state, control, **kw):  # our rows travel with TRL's checkpoint
            if distributed.is_main():
                write_json(f"{args.output_dir}/checkpoint-{state.global_step}/{HISTORY}", history)

    save = bool(checkpoint_dir and cfg.checkpoint_every)
    out_dir = checkpoint_dir if save else tempfile.mkdtemp(prefix="trl-grpo-")
    # TRL resumes any checkpoint it finds: only one written by this same run may be resumed
    if save and distributed.is_main():
        run = checkpoint.fingerprint(run_identity(cfg, scenarios, env, fingerprint))
        stamp = Path(out_dir, "run.fingerprint")
        if Path(out_dir).is_dir() and (not stamp.exists() or stamp.read_text() != run):
            log.warning("trl backend: %s holds checkpoints of another run; starting from scratch", out_dir)
            shutil.rmtree(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        stamp.write_text(run)
    distributed.barrier()  # the other ranks look for checkpoints once rank 0 has cleared stale ones
    ds = cfg.distributed
    deepspeed = (
        str(Path(__file__).parent / f"deepspeed/zero{ds.zero_stage}.json") if ds.strategy == "deepspeed" else None
    )
    args = TRLConfig(
        output_dir=out_dir,
        **trl_settings(cfg, env.config, device),
        max_completion_length=env.config.max_new_tokens * env.config.max_turns,
        logging_steps=1,
        logging_nan_inf_filter=False,  # transformers would log a NaN loss as the mean of the earlier ones
        report_to="none",
        save_strategy="steps" if save else "no",
        save_steps=cfg.checkpoint_every or 500,
        disable_tqdm=not distributed.is_main(),
        deepspeed=deepspeed,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=composite_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora_r, cfg.lora_alpha),
        callbacks=[Metrics()],
        rollout_func=rollout_func,
    )
    plugin = trainer.accelerator.state.deepspeed_plugin
    log.info(
        "trl backend: rank %d of %d, accelerate %s%s",
        distributed.rank(),
        distributed.world(),
        trainer.accelerator.distributed_type.value,
        f" (ZeRO stage {plugin.zero_stage})" if plugin else "",
    )
    resume = get_last_checkpoint(out_dir) if save else None
    if resume:
        log.info("trl backend: resuming from %s", resume)
        history += read_json(Path(resume, HISTORY))
    trainer.train(resume_from_checkpoint=resume)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(out_dir, ignore_errors=True)
    return trainer.accelerator.unwrap_model(trainer.model), history
