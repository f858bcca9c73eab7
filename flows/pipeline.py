"""The Prefect flow `grpo-pipeline`: runs the stages of dvc.yaml in order, skipping the ones DVC
says are up to date, under one MLflow parent run.

Wiring only: each stage is a Prefect task that calls the stage's entry function, then records the
run in dvc.lock (`dvc commit`), so `dvc status` is clean afterwards and a later `dvc repro` (or flow
run) skips it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import base_model, calibrate, evaluate, label, prepare, register, train_policy, train_reward
from tasks.common import PARENT_RUN_ENV, load_params, setup_mlflow

# The order must equal the topological order of dvc.yaml (tests/test_flow_order.py checks it).
STAGES = [
    ("base_model", base_model.run),
    ("prepare", prepare.run),
    ("label", label.run),
    ("train_reward", train_reward.run),
    ("calibrate", calibrate.run),
    ("train_policy", train_policy.run),
    ("evaluate", evaluate.run),
    ("register", register.run),
]


def dvc_repo():
    from dvc.repo import Repo

    return Repo(".")


@task(name="dvc-status")
def is_stale(stage: str) -> bool:
    with dvc_repo() as repo:
        return bool(repo.status(targets=[stage]))


@task(name="stage")
def run_stage(stage: str, entry, params: dict) -> dict:
    t0 = time.perf_counter()
    summary = entry(params)
    with dvc_repo() as repo:
        repo.commit(stage, force=True)
    get_run_logger().info("%s finished in %.1f s: %s", stage, time.perf_counter() - t0, summary)
    if stage == "evaluate":  # the stage's markdown report: comparison table and example conversations
        create_markdown_artifact(markdown=Path(params["paths"]["metrics"], "eval.md").read_text(), key="evaluation",
                                 description="trained vs base (and champion) on the held-out scenarios")
    return summary


@flow(name="grpo-pipeline", log_prints=True)
def grpo_pipeline(force: bool = False) -> dict:
    """Run every stale stage in DAG order (all of them with ``force``)."""
    params = load_params()
    mlflow = setup_mlflow(params)
    ran, skipped = {}, []
    with mlflow.start_run(run_name="grpo-pipeline", tags={"pipeline": "prefect"}) as parent:
        os.environ[PARENT_RUN_ENV] = parent.info.run_id
        try:
            for name, entry in STAGES:
                if force or is_stale(name):
                    ran[name] = run_stage.with_options(name=name)(name, entry, params)
                else:
                    skipped.append(name)
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
        mlflow.set_tags({"stages_run": ",".join(ran) or "none", "stages_skipped": ",".join(skipped) or "none"})
    return {"ran": ran, "skipped": skipped, "parent_run_id": parent.info.run_id}


def summary_text(params: dict) -> str:
    from grpo.io import read_json

    m = params["paths"]["metrics"]
    ev, reg = read_json(f"{m}/eval.json"), read_json(f"{m}/register.json")
    name = reg["model_name"]
    lines = ["", "=== grpo-pipeline summary ===",
             f"mean reward on {ev['scenarios']} held-out scenarios: base {ev['base']['reward_mean']:.3f}, "
             f"trained {ev['trained']['reward_mean']:.3f}"
             + (f", champion v{ev['champion_version']} {ev['champion']['reward_mean']:.3f}" if ev.get("champion_version") else "")]
    for other in ("base", "champion"):
        if f"vs_{other}" in ev:
            d, w = ev[f"vs_{other}"], ev["judge"][f"vs_{other}"]
            lines.append(f"trained - {other}: {d['mean']:+.3f}, {int(d['level'] * 100)}% CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]; "
                         f"judge {w['wins']}W/{w['losses']}L/{w['ties']}T, {w['unjudged']} unjudged")
    lines.append(f"flagged: {'; '.join(ev['flags']) if ev['flagged'] else 'no'}; report: {m}/eval.md")
    return "\n".join(lines + [
        f"registered: {name} version {reg['version']}, aliases {', '.join(reg['aliases'])} ({reg['reason']})",
        f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{params['paths']['mlflow_db']}",
        f"serve:      PATH=.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///{params['paths']['mlflow_db']} "
        f"mlflow models serve -m models:/{name}@{'champion' if reg['promoted'] else 'challenger'} --env-manager local -p 5001",
    ])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the GRPO pipeline as a Prefect flow.")
    ap.add_argument("--force", action="store_true", help="run every stage even if DVC says it is up to date")
    args = ap.parse_args()
    grpo_pipeline(force=args.force)
    print(summary_text(load_params()))
