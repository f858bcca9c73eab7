"""``train_policy.backend: trl``: the same stage through TRL's GRPOTrainer, for the ecosystem path
and as a side-by-side reference for the native loop (grpo/trainer.py).

Our scenarios become TRL's dataset (conversational prompts: the system prompt with any tool
declarations, and the opening), and our composite reward becomes a TRL reward function that scores
each scenario's group together, as the native loop does. TRL's GRPOTrainer generates one completion
per prompt, so this backend trains the first agent turn only: multi-turn episodes, the user
simulator and tool execution are the native backend's. TRL's logs are renamed to the native
loop's metric names, so both backends fill the same MLflow metrics and plots columns.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import numpy as np

from grpo.scenarios import Scenario
from grpo.trainer import GRPOConfig

# TRL log key -> the native loop's metric name
RENAME = {"reward": "reward_mean", "reward_std": "reward_std", "kl": "kl", "entropy": "entropy", "loss": "loss",
          "grad_norm": "grad_norm", "clip_ratio/low_mean": "clip_low", "clip_ratio/high_mean": "clip_high",
          "completions/mean_length": "completion_length", "frac_reward_zero_std": "zero_std_group_frac"}


def train_trl(model, tokenizer, scenarios: list[Scenario], reward_fn: Callable, cfg: GRPOConfig, rollout: dict,
              device: str, on_step: Callable[[int, dict], None] | None = None, output_dir: str | None = None):
    """Train LoRA adapters with TRL's GRPOTrainer. Returns ``(peft_model, history)`` like
    :func:`grpo.trainer.train`."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    by_id = {s.id: s for s in scenarios}
    dataset = Dataset.from_list([{"prompt": s.first_messages(), "scenario_id": s.id} for s in scenarios])
    components: dict[str, list[float]] = {}

    def composite_reward(prompts, completions, scenario_id, **_):
        """Score each scenario's completions as one group with the composite reward."""
        out = [0.0] * len(completions)
        for sid in dict.fromkeys(scenario_id):
            idx = [i for i, x in enumerate(scenario_id) if x == sid]
            total, raw = reward_fn([list(prompts[i]) + list(completions[i]) for i in idx], by_id[sid])
            for i, v in zip(idx, total):
                out[i] = float(v)
            for k, v in raw.items():
                components.setdefault(k, []).extend(np.asarray(v, dtype=float).tolist())
        return out

    history: list[dict] = []
    clock = {"t": time.perf_counter()}

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return
            now = time.perf_counter()
            row = {"step": state.global_step, **{new: float(logs[old]) for old, new in RENAME.items() if old in logs},
                   **{f"reward/{k}": float(np.mean(v)) for k, v in components.items()}, "step_seconds": now - clock["t"]}
            clock["t"] = now
            components.clear()
            history.append(row)
            if on_step:
                on_step(state.global_step, row)

    batch = cfg.scenarios_per_step * cfg.group_size
    args = TRLConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl-grpo-"), use_cpu=device == "cpu", bf16=False,
        max_steps=cfg.steps, learning_rate=cfg.learning_rate, per_device_train_batch_size=batch,
        num_generations=cfg.group_size, max_completion_length=rollout["max_new_tokens"],
        temperature=rollout["temperature"], top_p=rollout["top_p"], beta=cfg.beta, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
        scale_rewards={"group": "group", "batch": "batch", "none": "none"}[cfg.scale_rewards],
        importance_sampling_level=cfg.importance_sampling_level, num_iterations=cfg.num_iterations,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=False,
    )
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=composite_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Metrics()])
    trainer.train()
    return trainer.model, history
