"""The sft stage's step with bf16 autocast against fp32, side by side (``sft.bf16``).

The same first ``--demos`` demonstrations of the prepared train set (grpo/sft.py, as the stage
builds them with params.yaml's rollout settings), one epoch of params.yaml's sft settings, from the
same policy and seed, alternating fp32 and bf16 ``--repeats`` times; each run loads the model
afresh. Prints seconds per step and each run's losses, then the bf16 / fp32 ratio. Needs
data/prepared and the policy (the base_model and prepare stages).

    .venv/bin/python bench/sft_step.py --demos 24 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demos", type=int, default=24, help="demonstrations (batch_size of them make a step)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="data/models/base", help="the policy SFT starts from")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pandas as pd
    import torch

    from grpo import scenarios
    from grpo.models import load_policy
    from grpo.rollout import ConversationEnvironment
    from grpo.sft import demonstrations, train_sft
    from grpo_agents.params import load_params

    params = load_params(ROOT / "params.yaml")
    train_set = scenarios.from_frame(pd.read_parquet(ROOT / params.paths.prepared / "train.parquet"))
    per_step: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            model, tokenizer = load_policy(args.model, "cpu")
            demos = demonstrations(ConversationEnvironment(tokenizer, params.rollout), train_set)[: args.demos]
            config = params.sft.model_copy(update={"epochs": 1, "bf16": bf16})
            torch.manual_seed(params.seed)
            t0 = time.perf_counter()
            _, history = train_sft(model, tokenizer, demos, config, params.seed, "cpu")
            seconds = (time.perf_counter() - t0) / len(history)
            per_step[bf16].append(seconds)
            losses = " ".join(f"{r['loss']:.3f}" for r in history)
            print(f"{'bf16' if bf16 else 'fp32'}: {seconds:5.2f} s/step ({len(history)} steps)  losses {losses}")
    fp32, bf16 = (statistics.mean(per_step[k]) for k in (False, True))
    print(f"sft step, bf16 autocast / fp32: {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
