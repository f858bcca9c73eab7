"""Stage 5, sft: the supervised warm start. LoRA SFT of the base policy (TRL's SFTTrainer) on
demonstrations built from the training scenarios (grpo/sft.py): correct tool calls with the tool's
real result and an answer that uses it, and the scenarios' example responses. Never from the eval
set.

Reads the base model and the prepared train set; writes the merged SFT policy to `paths.sft_model`,
`paths.metrics`/sft.json and the loss curve `paths.plots`/sft.csv. train_policy starts from this
policy, and its KL reference is this policy (the LoRA adapter disabled). With `sft.enabled: false`
the stage writes only a note in `paths.sft_model` that it was skipped, and train_policy and
evaluate start from the base model, as before this stage existed.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from grpo import scenarios
from grpo.config import RolloutConfig, SFTConfig
from grpo.io import atomic_path, write_json
from grpo.models import load_policy, save_policy
from grpo.rollout import ConversationEnvironment
from grpo.sft import demonstrations, train_sft
from grpo_agents.params import Paths
from mlflow_io.tracking import log_metrics

log = logging.getLogger(__name__)
SKIPPED = "SKIPPED.json"  # what a disabled stage writes in paths.sft_model


def run(sft: SFTConfig, rollout: RolloutConfig, seed: int, device: str, paths: Paths) -> dict:
    if not sft.enabled:  # every output DVC expects exists, saying that the stage was skipped
        with atomic_path(paths.sft_model, is_dir=True) as tmp:
            write_json(f"{tmp}/{SKIPPED}", {"enabled": False, "start_model": paths.base_model})
        with atomic_path(f"{paths.plots}/sft.csv") as tmp:
            pd.DataFrame(columns=["step", "loss", "mean_token_accuracy"]).to_csv(tmp, index=False)
        summary = {"enabled": 0}
        write_json(f"{paths.metrics}/sft.json", summary)
        log.info("sft.enabled is false: train_policy starts from %s", paths.base_model)
        return summary
    train_set = scenarios.from_frame(pd.read_parquet(f"{paths.prepared}/train.parquet"))
    model, tokenizer = load_policy(paths.base_model, device)
    demos = demonstrations(ConversationEnvironment(tokenizer, rollout), train_set)
    if not demos:
        raise ValueError(
            f"{paths.prepared}/train.parquet: no scenario gives a demonstration (a tool call whose "
            "arguments its opening names, or an example response); set sft.enabled: false"
        )
    with_tools = sum(d.tool_calls for d in demos)
    longest = [max(map(len, d.agent_runs())) for d in demos]  # each demonstration's longest agent turn
    too_long = sum(n > rollout.max_new_tokens for n in longest)
    if too_long:  # the policy would learn replies that rollouts cut off
        calls = sum(len(d.agent_runs()[0]) > rollout.max_new_tokens for d in demos if d.tool_calls)
        log.warning(
            "sft: %d of %d demonstrations have an agent turn longer than rollout.max_new_tokens %d (the "
            "longest: %d tokens; %d of them a tool call, which a cut makes malformed); rollouts will cut them",
            too_long,
            len(demos),
            rollout.max_new_tokens,
            max(longest),
            calls,
        )
    log.info(
        "sft: %d demonstrations (%d with a tool call) from %d training scenarios; %d give none",
        len(demos),
        with_tools,
        len(train_set),
        len(train_set) - len(demos),
    )
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    merged, history = train_sft(model, tokenizer, demos, sft, seed, model.device.type)
    seconds = time.perf_counter() - t0
    save_policy(merged, tokenizer, paths.sft_model)
    with atomic_path(f"{paths.plots}/sft.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    k = max(1, len(history) // 4)
    summary = {
        "enabled": 1,
        "demonstrations": len(demos),
        "tool_demonstrations": with_tools,
        "scenarios_without_demonstration": len(train_set) - len(demos),
        "steps": len(history),
        "loss_first_quarter": sum(r["loss"] for r in history[:k]) / k,
        "loss_last_quarter": sum(r["loss"] for r in history[-k:]) / k,
        "seconds": seconds,
    }
    write_json(f"{paths.metrics}/sft.json", summary)
    for row in history:
        log_metrics({"loss": row["loss"]}, row["step"])
    log_metrics(summary)
    return summary


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("sft")
