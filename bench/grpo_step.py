"""GRPO step time and peak RSS of the native trainer against TRL, side by side (issue 14).

Two comparisons, each on the same 4 seed scenarios (one group each, every step), the real policy,
the train_policy settings of params.yaml (group size, loss, beta, clipping, LoRA, micro-batch) and a
cheap reward (the last reply's length), so the figures are generation and update, not reward models:

- single-turn: the native loop with one agent turn against stock TRL ``GRPOTrainer`` with TRL's own
  generation, on the same conversational prompts and completion length (``rollout.max_new_tokens``);
- multi-turn: the native loop against ``backend: trl`` (grpo/trl_backend.py), both on
  params.yaml's episodes (``rollout.max_turns`` agent turns with the scripted user in between).

Each run is its own process, so its peak RSS (``ru_maxrss``) is its own. Runs alternate, native
then TRL, ``--repeats`` times; each run's first step is left out as warm-up. ``--fp32-rollouts``
adds native runs with ``rollout.bf16: false`` beside them (where ``auto`` picks bf16 rollouts, this
measures what they bring).

    .venv/bin/python bench/grpo_step.py --steps 3 --repeats 1 [--fp32-rollouts]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("native-single", "trl-single", "native-multi", "trl-multi")


def length_reward(text: str) -> float:
    return len(text) / 100


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(run: str, steps: int, out: str, model_spec: str | None) -> None:
    """One run: ``steps`` GRPO steps; writes the step seconds and the process's peak RSS (after
    loading the model, and at the end) to ``out``."""
    import numpy as np
    import torch

    from grpo.models import load_policy, lora_config
    from grpo.rollout import ConversationEnvironment
    from grpo.scenarios import load_dir
    from grpo.trainer import train
    from grpo.trl_backend import train_trl
    from grpo_agents.params import load_params

    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(params.seed)
    model, tokenizer = load_policy(model_spec or params.base_model.source, "cpu")
    load_mb = peak_mb()
    by_domain = {}
    for s in load_dir(ROOT / params.paths.scenarios):
        by_domain.setdefault(s.domain, s)
    scenarios = list(by_domain.values())[:4]
    single = "-single" in run
    update = ({"max_turns": 1} if single else {}) | ({"bf16": False} if run.endswith("-fp32") else {})
    rollout = params.rollout.model_copy(update=update)
    env = ConversationEnvironment(tokenizer, rollout)
    cfg = params.train_policy.model_copy(
        update={"steps": steps, "scenarios_per_step": len(scenarios), "checkpoint_every": 0, "seed": params.seed}
    )

    def reward(convs, scenario):
        raw = np.array([length_reward(c[-1]["content"]) for c in convs], dtype=float)
        return raw, {"length": raw}

    if run.startswith("native"):
        _, history = train(model, tokenizer, scenarios, reward, env, cfg)
        seconds = [r["step_seconds"] for r in history]
        rewards = [r["reward_mean"] for r in history]
    elif run == "trl-multi":
        _, history = train_trl(model, tokenizer, scenarios, reward, env, cfg, "cpu")
        seconds = [r["step_seconds"] for r in history]
        rewards = [r["reward_mean"] for r in history]
    else:
        seconds, rewards = stock_trl(model, tokenizer, env, scenarios, cfg, lora_config(cfg.lora_r, cfg.lora_alpha))
    result = {"seconds": seconds, "rewards": rewards, "load_mb": load_mb, "peak_mb": peak_mb()}
    Path(out).write_text(json.dumps(result))


def stock_trl(model, tokenizer, env, scenarios, cfg, peft_config) -> tuple[list[float], list[float]]:
    """Stock TRL: GRPOTrainer generating with its own ``generate``, nothing of ours but the prompts,
    the settings and the reward."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.trl_backend import trl_settings

    seconds, rewards = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            seconds.append(now - self.t)
            self.t = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    def reward(completions, **_):
        return [length_reward(c[-1]["content"]) for c in completions]

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            **trl_settings(cfg, env.config, "cpu"),
            max_completion_length=env.config.max_new_tokens,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        dataset = Dataset.from_list([{"prompt": env.first_messages(s)} for s in scenarios])
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        trainer.train()
    return seconds, rewards


def run(name: str, steps: int, model: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/run.json"
        cmd = [sys.executable, __file__, "--worker", name, out, "--steps", str(steps)]
        subprocess.run(cmd + (["--model", model] if model else []), check=True, cwd=ROOT)
        result = json.loads(Path(out).read_text())
    result["seconds"] = result["seconds"][1:]  # warm-up
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", choices=("single", "multi"), help="one of the two comparisons")
    ap.add_argument(
        "--model",
        help="the policy (default: params.yaml base_model.source; data/models/base, written by the base_model "
        "stage, loads without the GGUF's dequantisation and so shows training's own peak RSS)",
    )
    ap.add_argument("--fp32-rollouts", action="store_true", help="also native runs with rollout.bf16: false")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, args.worker[1], args.model)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = [r for n in RUNS for r in ([n, n + "-fp32"] if args.fp32_rollouts and n.startswith("native") else [n])]
    names = [n for n in runs if not args.only or f"-{args.only}" in n]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            results[name].append(run(name, args.steps, args.model))
    step = {n: statistics.mean(s for r in rs for s in r["seconds"]) for n, rs in results.items()}
    for n, rs in results.items():
        steps = sum(len(r["seconds"]) for r in rs)
        reward = statistics.mean(x for r in rs for x in r["rewards"])
        peak, load = (max(r[k] for r in rs) / 1024 for k in ("peak_mb", "load_mb"))
        print(
            f"{n:>18}: {step[n]:6.1f} s/step ({steps} steps)  peak RSS {peak:5.2f} GB "
            f"(model loaded: {load:4.2f})  mean reward {reward:.3f}"
        )
    for kind in ("single", "multi"):
        if f"native-{kind}-fp32" in step:
            fp32 = step[f"native-{kind}-fp32"]
            print(f"native {kind}-turn, rollouts as configured / fp32 rollouts: {step[f'native-{kind}'] / fp32:.2f}")
    ratios = [
        f"{kind}-turn {step[f'native-{kind}'] / step[f'trl-{kind}']:.2f}"
        for kind in ("single", "multi")
        if f"native-{kind}" in step
    ]
    print("native / TRL step time: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
