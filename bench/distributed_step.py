"""GRPO step time of the native trainer in 1 process against 2 (torchrun, gloo, DDP), side by side.

Both runs take the same global batch (params.yaml's rollout and train_policy settings: scenarios
per step, group size, turns, tokens) on the seed scenarios with the real policy, and a cheap
reward (the last reply's length) so the figure is generation and update, not reward models. Runs
alternate, ``--repeats`` times each; the first step of each run is left out as warm-up.

    .venv/bin/python bench/distributed_step.py --steps 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(steps: int, out: str) -> None:
    """One torchrun rank: train ``steps`` steps; rank 0 writes the step seconds to ``out``."""
    import numpy as np
    import torch

    from grpo import distributed
    from grpo.models import load_policy
    from grpo.rollout import ConversationEnvironment
    from grpo.scenarios import load_dir
    from grpo.trainer import train
    from grpo_agents.params import load_params

    params = load_params(ROOT / "params.yaml")
    distributed.init(torch.device("cpu"))
    model, tokenizer = load_policy(params.base_model.source, "cpu")
    env = ConversationEnvironment(tokenizer, params.rollout)
    scenarios = load_dir(ROOT / params.paths.scenarios)

    def reward(convs, scenario):
        raw = np.array([len(c[-1]["content"]) / 100 for c in convs], dtype=float)
        return raw, {"length": raw}

    cfg = params.train_policy.model_copy(update={"steps": steps, "checkpoint_every": 0, "seed": params.seed})
    _, history = train(model, tokenizer, scenarios, reward, env, cfg)
    if distributed.is_main():
        Path(out).write_text(json.dumps([r["step_seconds"] for r in history]))


def run(ranks: int, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/steps.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
        subprocess.run([*cmd, __file__, "--worker", out, "--steps", str(steps)], check=True, env=env, cwd=ROOT)
        return json.loads(Path(out).read_text())[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.worker)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            times[ranks] += run(ranks, args.steps)
    one, two = statistics.mean(times[1]), statistics.mean(times[2])
    print(f"1 process : {one:6.1f} s/step  ({len(times[1])} steps)")
    print(f"2 processes: {two:6.1f} s/step  ({len(times[2])} steps)")
    print(f"2-process / 1-process step time: {two / one:.2f}")


if __name__ == "__main__":
    main()
