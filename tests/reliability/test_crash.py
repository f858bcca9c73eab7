"""Crash safety: the pipeline from scratch on the tiny models, killed with SIGKILL (its whole process
group: DVC or the Prefect flow, its temporary Prefect server, the stage's process) during each stage
in turn, then started again; the last run goes to the end. Four of the runs are `dvc repro` and four
`grpo-agents run` (the Prefect flow), mixed, so each picks up what the other left.

After each kill: the killed stage is not recorded as done, every output file that exists is whole
(it parses or loads), and the next run runs only the stage it interrupted and the next. train_policy
resumes from its checkpoint, and register, killed just after the agent's version was created, reuses
that version. At the end: the outputs and the registry are as after an uninterrupted run (one version
of each model), each stage ran twice in MLflow and nothing is left RUNNING (killed runs are KILLED), nothing
temporary is left, and a further `dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import safetensors.torch
import torch
import yaml
from conftest import BIN, check_outputs, dvc_status, make_project, mlflow_client, sh, write_params

from grpo_agents.stages import STAGES

# When each stage is killed, and by which interface's run: a line of the stage's output that shows it
# is into its work, or for train_policy its first checkpoint on disk (steps: 3, one after each step).
DVC, FLOW = [str(BIN / "dvc"), "repro"], [str(BIN / "grpo-agents"), "run"]
KILL_AT = {
    "base_model": (DVC, "Loading weights"),  # the source model is being read
    "prepare": (FLOW, "Calculating Metrics"),  # Great Expectations is validating
    "label": (DVC, "served on"),  # rollouts done, the judge is answering
    "train_reward": (DVC, "Saving model to"),  # the reward model's directory is being written
    "calibrate": (FLOW, "Loading weights"),  # the reward model's encoder loads
    "sft": (DVC, "'loss': "),  # SFTTrainer logged its first step
    "train_policy": (FLOW, Path("data/checkpoints/policy/checkpoint.pt")),
    "evaluate": (DVC, "eval held-out trained"),  # the base is evaluated, the trained policy is being
    "register": (FLOW, "of model 'grpo-agent'"),  # the agent's version exists; its alias and gate do not yet
}
# What the run after the kill must say, beyond running the stage again.
ON_RERUN = {
    "train_policy": "resuming from data/checkpoints/policy/checkpoint.pt at step",
    "register": "was registered from the same inputs: no new version",
}


def started(out: str) -> list[str]:
    """The stages a run started (grpo_agents/stages.py logs it, under either interface)."""
    return [s for s in STAGES if f"stage {s} started" in out]


def run_until(project: Path, env: dict, stage: str) -> str:
    """Start a run and SIGKILL its process group once ``stage`` reaches its kill point; returns the
    run's output."""
    cmd, mark = KILL_AT[stage]
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 600
    while True:
        out = b"".join(chunks).decode(errors="replace")
        _, begun, tail = out.partition(f"stage {stage} started")
        if begun and ((project / mark).exists() if isinstance(mark, Path) else mark in tail):
            break
        assert proc.poll() is None, f"{cmd} ended before {stage} reached {mark}:\n{out[-3000:]}"
        assert time.monotonic() < deadline, f"{stage} never reached {mark}:\n{out[-3000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return b"".join(chunks).decode(errors="replace")


def done(project: Path) -> set[str]:
    """The stages dvc.lock records."""
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def check_whole(project: Path) -> int:
    """Every output file that exists parses or loads (temporary files of a killed writer, which
    start with a dot, are not outputs); returns how many were checked."""
    checked = 0
    for root in ("data", "metrics", "plots"):
        for f in (project / root).rglob("*"):
            if not f.is_file() or any(part.startswith(".") for part in f.relative_to(project).parts):
                continue
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".parquet":
                pd.read_parquet(f)
            elif f.suffix == ".csv":
                pd.read_csv(f)
            elif f.suffix == ".safetensors":
                safetensors.torch.load_file(f)
            elif f.suffix == ".pt":
                torch.load(f, weights_only=True)
            else:
                continue
            checked += 1
    return checked


def test_the_pipeline_killed_during_each_stage_finishes_whole(tmp_path, tiny_model_dir):
    project, env = make_project(tmp_path, tiny_model_dir)
    write_params(
        project / "params.yaml",
        {"train_policy.steps": 3, "train_policy.checkpoint_every": 1},
        source=project / "params.yaml",
    )
    for i, stage in enumerate(STAGES):
        out = run_until(project, env, stage)
        # this run finished what the kill before it interrupted, and redid nothing
        assert started(out) == list(STAGES[max(0, i - 1) : i + 1]), out[-3000:]
        assert i == 0 or ON_RERUN.get(STAGES[i - 1], "") in out, out[-3000:]
        assert done(project) == set(STAGES[:i]), f"killed during {stage}"
        assert check_whole(project) > 0
    out = sh([str(BIN / "dvc"), "repro"], project, env)
    assert started(out) == ["register"] and ON_RERUN["register"] in out
    check_outputs(project)  # version 1 of the agent, champion and challenger
    client = mlflow_client(project)
    assert [len(client.search_model_versions(f"name='{m}'")) for m in ("grpo-agent", "grpo-reward")] == [1, 1]
    # every stage ran twice: killed, then to the end. A killed run was marked KILLED by a later one,
    # unless the kill came after the stage's run had ended but before DVC recorded it (then it ran
    # again, as it should); nothing is left RUNNING
    runs = Counter(
        (r.info.run_name, r.info.status)
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    )
    assert all(status in ("FINISHED", "KILLED") for _, status in runs), runs
    assert all(runs[(s, "FINISHED")] >= 1 and runs[(s, "FINISHED")] + runs[(s, "KILLED")] == 2 for s in STAGES), runs
    assert runs[("grpo-pipeline", "KILLED")] == 4, runs
    leftovers = [
        p for r in ("data", "metrics", "plots") for p in (project / r).rglob(".*") if p.name.endswith((".tmp", ".old"))
    ]
    assert leftovers == []
    assert "didn't change" in sh([str(BIN / "dvc"), "repro"], project, env)
    assert dvc_status(project, env) == {}
