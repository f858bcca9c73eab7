"""The Prefect flow `grpo-pipeline`: runs the stages of dvc.yaml in order, skipping the ones DVC
says are up to date, under one MLflow parent run.

Wiring only: each stage is a Prefect task that calls the stage's entry function, then records the
run in dvc.lock (`dvc commit`), so `dvc status` is clean afterwards and a later `dvc repro` (or flow
run) skips it. Three stages publish a Prefect artifact under a stable key: prepare
(`validation-summary`), evaluate (`evaluation`) and register (`registry-decision`).

One run at a time per project: the flow holds a file lock for its whole run, so a second run (from
the CLI, a deployment or the schedule) is refused with a message instead of racing the first over
params.yaml, dvc.lock and the registry. The deployments in prefect.yaml also queue their own runs
(a concurrency limit of 1), so a second triggered run waits rather than fails.

With ``rollout_workers`` > 1 (or a ``dask_address``), label's and evaluate's rollout jobs run as
Prefect tasks (``rollout``) on a DaskTaskRunner (prefect-dask): a local cluster of that many
worker processes, or the Dask cluster at the address. The outputs are the same as one after another
(each job seeds itself), so DVC sees no difference.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from grpo.evaluation import ci_line
from grpo.io import read_json
from grpo.rollout import RolloutJob, jobs_run_by, run_job
from grpo_agents import stages
from grpo_agents.params import Params, load_params, set_params
from mlflow_io.registry import sync_champion
from mlflow_io.tracking import PARENT_RUN_ENV, owner_tags, setup

LOCK = Path(".dvc/tmp/grpo-pipeline.lock")  # .dvc/tmp is DVC's own git-ignored scratch directory


class PipelineBusy(RuntimeError):
    """Another grpo-pipeline run holds this project's lock."""


def dvc_repo():
    from dvc.repo import Repo

    return Repo(".")


@task(name="dvc-status")
def is_stale(stage: str) -> bool:
    with dvc_repo() as repo:
        return bool(repo.status(targets=[stage]))


@task(name="rollout", task_run_name="{job.name}", cache_policy=NO_CACHE)
def rollout(job: RolloutJob) -> tuple:
    return run_job(job)


class DaskJobMap:
    """Runs rollout jobs as :func:`rollout` tasks on a prefect-dask DaskTaskRunner, on the Dask
    cluster at ``address`` (its workers must see the project's paths and have this package
    installed), or on a local cluster of ``workers`` processes, started at the first jobs and kept
    for the flow run (:meth:`close`), so the second stage finds its workers warm. A local worker
    runs a job with ``cpu_count // workers`` torch threads, so the workers do not oversubscribe the cores."""

    def __init__(self, workers: int, address: str | None = None):
        self.workers, self.address, self.cluster = workers, address, None
        self.where = f"the Dask cluster at {address}" if address else f"a local Dask cluster of {workers} workers"

    def __call__(self, jobs: list[RolloutJob]) -> list:
        from prefect_dask import DaskTaskRunner

        if not self.address and self.cluster is None:
            from distributed import LocalCluster

            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True)
        if self.cluster is not None:
            jobs = [replace(j, threads=max(1, (os.cpu_count() or 1) // self.workers)) for j in jobs]
        with DaskTaskRunner(address=self.address or self.cluster.scheduler_address) as runner:
            futures = [runner.submit(rollout, {"job": j}) for j in jobs]
            return [f.result() for f in futures]

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


@task(name="stage")
def run_stage(stage: str, params: Params) -> dict:
    t0 = time.perf_counter()
    summary = stages.run_stage(stage, params)
    with dvc_repo() as repo:
        repo.commit(stage, force=True)
    get_run_logger().info("%s finished in %.1f s: %s", stage, time.perf_counter() - t0, summary)
    publish(stage, summary, params)
    return summary


def table(rows: dict[str, Any]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())])


def publish(stage: str, summary: dict, params: Params) -> None:
    """The stage's Prefect artifact, under a key that stays the same from run to run."""
    if stage == "prepare":
        report = read_json(f"{params.paths.prepared}/validation.json")
        verdict = "passed" if report["success"] else f"{report['failed']} failed"
        markdown = f"Great Expectations: {report['evaluated']} expectations, {verdict}\n\n{table(summary)}"
        create_markdown_artifact(markdown, key="validation-summary", description="prepared scenarios and validation")
    elif stage == "evaluate":  # the stage's markdown report: comparison table and example conversations
        markdown = Path(params.paths.metrics, "eval.md").read_text()
        create_markdown_artifact(markdown, key="evaluation", description="trained vs base (and champion), held out")
    elif stage == "register":
        verdict = "promoted to champion" if summary["promoted"] else "not promoted"
        markdown = f"{summary['model_name']} version {summary['version']}: {verdict}\n\n{table(summary)}"
        create_markdown_artifact(markdown, key="registry-decision", description="the promotion gate's decision")


@flow(name="grpo-pipeline", log_prints=True)
def grpo_pipeline(
    force: bool = False,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    rollout_workers: int = 1,
    dask_address: str | None = None,
) -> dict:
    """Run every stale stage in DAG order (all of them with ``force``).

    ``profile`` and ``overrides`` (dotted params.yaml keys, e.g. ``{"train_policy.steps": 4}``) are
    written into params.yaml first, as ``dvc exp run -S`` does, so dvc.lock and every stage's MLflow
    run record what ran. ``rollout_workers`` > 1 runs label's and evaluate's rollouts on a local
    Dask cluster of that many processes; ``dask_address`` on an existing Dask cluster."""
    for name in stages.STAGE_LOGGERS:  # their INFO records too, not only warnings
        logging.getLogger(name).setLevel(logging.INFO)
    if rollout_workers < 1:
        raise ValueError(f"rollout_workers must be at least 1, got {rollout_workers}")
    job_map = DaskJobMap(rollout_workers, dask_address) if rollout_workers > 1 or dask_address else None
    # set here, not passed to the stage tasks: Prefect sends a task's context (its parent's
    # parameters too) to the Dask workers, and the local cluster does not pickle
    try:
        with project_lock(), jobs_run_by(job_map):
            return run_pipeline(force, apply_overrides(profile, overrides))
    finally:
        if job_map is not None:
            job_map.close()


def apply_overrides(profile: str | None, overrides: dict[str, Any] | None) -> Params:
    """Write ``profile`` and ``overrides`` into params.yaml (validated, atomically); the params to run with."""
    changes = {**({"profile": profile} if profile else {}), **(overrides or {})}
    if not changes:
        return load_params()
    params = set_params(changes)
    print(f"params.yaml updated: {changes}")
    return params


@contextmanager
def project_lock():
    """Hold this project's pipeline lock, or raise PipelineBusy at once."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(LOCK, timeout=0)
        lock.acquire()
    except Timeout:
        raise PipelineBusy(
            f"another grpo-pipeline run is active in {Path.cwd()} (it holds {LOCK}); "
            "wait for it to finish, or stop it, then run again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def run_pipeline(force: bool, params: Params) -> dict:
    mlflow = setup(params)
    ran, skipped = {}, []
    # The champion may have moved since the last run (the MLflow UI, another project): what DVC sees
    # of it is refreshed first, so a moved champion makes evaluate stale.
    sync_champion(MlflowClient(), params.register.model_name, params.paths)
    with mlflow.start_run(run_name="grpo-pipeline", tags={"pipeline": "prefect", **owner_tags()}) as parent:
        os.environ[PARENT_RUN_ENV] = parent.info.run_id
        try:
            for name in stages.STAGES:
                if force or is_stale(name):
                    ran[name] = run_stage.with_options(name=name)(name, params)
                else:
                    skipped.append(name)
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
        mlflow.set_tags({"stages_run": ",".join(ran) or "none", "stages_skipped": ",".join(skipped) or "none"})
    return {"ran": ran, "skipped": skipped, "parent_run_id": parent.info.run_id}


def summary_text(params: Params) -> str:
    metrics, db = params.paths.metrics, params.paths.mlflow_db
    ev, reg = read_json(f"{metrics}/eval.json"), read_json(f"{metrics}/register.json")
    name, alias = reg["model_name"], "champion" if "champion" in reg["aliases"] else "challenger"
    champion = (
        f", champion v{ev['champion_version']} {ev['champion']['reward_mean']:.3f}"
        if ev.get("champion_version")
        else ""
    )
    policies = [p for p in ("base", "sft", "trained") if p in ev]  # "sft" where the warm start ran
    label = {"base": "base", "sft": "SFT only", "trained": "trained"}

    def rate(policy: str, key: str) -> str:  # nan where no episode (or no call) counts
        return "n/a" if math.isnan(ev[policy][key]) else f"{ev[policy][key]:.0%}"

    return "\n".join(
        [
            "",
            "=== grpo-pipeline summary ===",
            f"mean reward on {ev['scenarios']} held-out scenarios: "
            + ", ".join(f"{label[p]} {ev[p]['reward_mean']:.3f}" for p in policies)
            + champion,
            *(ci_line(ev, other) for other in ("base", "sft", "champion") if f"vs_{other}" in ev),
            "tool scenarios: episodes that called "
            + ", ".join(f"{label[p]} {rate(p, 'tool_call_rate')}" for p in policies)
            + "; calls that succeeded "
            + ", ".join(f"{label[p]} {rate(p, 'tool_success')}" for p in policies),
            f"flagged: {'; '.join(ev['flags']) if ev['flagged'] else 'no'}; report: {metrics}/eval.md",
            f"registered: {name} version {reg['version']}, aliases {', '.join(reg['aliases'])} ({reg['reason']})",
            f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{db}",
            f"serve:      .venv/bin/grpo-agents serve --alias {alias}   (or: MLFLOW_TRACKING_URI=sqlite:///{db} "
            f".venv/bin/mlflow models serve -m models:/{name}@{alias} --env-manager local -p 5001)",
        ]
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the GRPO pipeline as a Prefect flow.")
    ap.add_argument("--force", action="store_true", help="run every stage even if DVC says it is up to date")
    args = ap.parse_args()
    grpo_pipeline(force=args.force)
    print(summary_text(load_params()))
