"""Stage 5, train_policy: GRPO with LoRA on the base policy over multi-turn scenario episodes.

Reads the base model, the prepared train set, the reward model and the calibration; writes the
merged policy to `paths.policy`, `paths.metrics`/train.json and the per-step curve
`paths.plots`/train.csv. The reference policy is the base with the adapter disabled.
"""

from __future__ import annotations

import pandas as pd

from grpo import scenarios as S
from grpo.io import atomic_path, write_json
from grpo.models import load_causal_lm, load_tokenizer, pick_device
from grpo.rollout import ConversationEnvironment
from grpo.trainer import GRPOConfig, train
from tasks.common import cli, log_metrics, stage_run
from tasks.scoring import load_reward


def run(params: dict) -> dict:
    paths = params["paths"]
    cfg = GRPOConfig.from_params({**params["train_policy"], "seed": params["seed"]})
    with stage_run("train_policy", params, ("train_policy", "rollout", "reward", "seed")) as (mlflow, _):
        scenarios = S.from_frame(pd.read_parquet(f"{paths['prepared']}/train.parquet"))
        tok = load_tokenizer(paths["base_model"])
        model = load_causal_lm(paths["base_model"], pick_device(params["device"]))
        env = ConversationEnvironment(tok, **params["rollout"])
        reward = load_reward(params)
        log_step = lambda step, row: log_metrics(mlflow, row, step)  # noqa: E731
        if cfg.backend == "trl":
            from grpo.trl_backend import train_trl

            model, history = train_trl(model, tok, scenarios, reward, env, cfg, model.device.type, log_step, paths["checkpoints"])
        elif cfg.backend == "native":
            model, history = train(model, tok, scenarios, reward, env, cfg, on_step=log_step, checkpoint_dir=paths["checkpoints"])
        else:
            raise ValueError(f"train_policy.backend must be 'native' or 'trl', got {cfg.backend!r}")
        merged = model.merge_and_unload()
        with atomic_path(paths["policy"], is_dir=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        with atomic_path(f"{paths['plots']}/train.csv") as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        k = max(1, len(history) // 4)
        summary = {
            "steps": len(history),
            "reward_first_quarter": sum(r["reward_mean"] for r in history[:k]) / k,
            "reward_last_quarter": sum(r["reward_mean"] for r in history[-k:]) / k,
            "kl_last": history[-1].get("kl", 0.0),
            **({"skipped_steps": history[-1]["skipped_steps"]} if "skipped_steps" in history[-1] else {}),  # native only
            "seconds_per_step": sum(r["step_seconds"] for r in history) / len(history),
        }
        write_json(f"{paths['metrics']}/train.json", summary)
        log_metrics(mlflow, summary)
    return summary


if __name__ == "__main__":
    cli(run)
