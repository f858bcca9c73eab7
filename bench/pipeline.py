"""Where a pipeline run's time went: each stage's wall time in the newest `grpo-pipeline` run (from
MLflow: the stage runs under that parent run), and a no-op `dvc repro` timed now.

    .venv/bin/python bench/pipeline.py [--project .]

Run it after `make run` (or `grpo-agents run`). The last line is the pipeline's total against the
10-minute target of issue 14.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from grpo_agents.params import load_params
from grpo_agents.stages import STAGES

TARGET_S = 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=".", help="the project directory (default: here)")
    args = ap.parse_args()
    os.chdir(args.project)
    params = load_params()
    client = MlflowClient(f"sqlite:///{Path(params.paths.mlflow_db).resolve()}")
    experiment = client.get_experiment_by_name("grpo-agents")
    if experiment is None:
        raise SystemExit("error: no MLflow experiment grpo-agents here: run the pipeline first (make run)")
    parents = client.search_runs(
        [experiment.experiment_id], "tags.mlflow.runName = 'grpo-pipeline'", order_by=["start_time DESC"], max_results=1
    )
    if not parents:
        raise SystemExit("error: no grpo-pipeline run here: run the pipeline first (make run)")
    parent = parents[0]
    stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    seconds = {
        r.data.tags.get("stage"): (r.info.end_time - r.info.start_time) / 1000 for r in stages if r.info.end_time
    }
    for stage in STAGES:
        shown = f"{seconds[stage]:7.1f} s" if stage in seconds else "      - (up to date, not run)"
        print(f"{stage:>13}: {shown}")
    flow = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1000
    dvc = str(Path(sys.executable).parent / "dvc")
    stale = subprocess.run([dvc, "status", "--json"], check=True, capture_output=True, text=True).stdout.strip()
    if stale not in ("{}", ""):  # a real run, not a no-op: not started here
        print(f"no-op dvc repro: not timed, stages are stale: {stale}")
    else:
        t0 = time.perf_counter()
        subprocess.run([dvc, "repro"], check=True, capture_output=True)
        print(f"no-op dvc repro: {time.perf_counter() - t0:.1f} s")
    print(
        f"pipeline (grpo-pipeline run {parent.info.run_id[:8]}): {flow:.0f} s; target {TARGET_S} s; ratio {flow / TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
