"""MLflow run tracking: one run per stage, nested under the pipeline's parent run when the Prefect
flow started one, with the params the stage reads logged. Stages log through the functions here."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import (  # noqa: F401  (re-exported for the stages)
    log_artifact,
    log_dict,
    log_params,
    log_table,
    log_text,
    set_tag,
)
from pydantic import BaseModel

from grpo.io import pid_alive
from grpo_agents.params import Params

log = logging.getLogger(__name__)
PARENT_RUN_ENV = "GRPO_PARENT_RUN_ID"  # set by the Prefect flow so stage runs nest under it


def tracking_uri(params: Params) -> str:
    # Absolute: MLflow caches one store per URI string, so a relative one would stick to the first
    # directory it was resolved in.
    return f"sqlite:///{Path(params.paths.mlflow_db).resolve()}"


def setup(params: Params):
    """Point MLflow at the project's SQLite store and experiment; returns the ``mlflow`` module."""
    Path(params.paths.mlflow_db).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(params))
    name = params.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(params.paths.mlflow_artifacts).resolve()
        mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    experiment = mlflow.set_experiment(name)
    close_abandoned(experiment.experiment_id)
    return mlflow


def owner_tags() -> dict[str, str]:
    """Which process a run belongs to, so that a later one can tell when it was killed."""
    return {"grpo.host": socket.gethostname(), "grpo.pid": str(os.getpid())}


def close_abandoned(experiment_id: str) -> None:
    """Mark KILLED the runs still RUNNING whose process, on this host, is gone (a pipeline killed
    outright cannot end its runs), so that the MLflow UI does not show them running for ever."""
    client = mlflow.MlflowClient()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get("grpo.pid", "")
        if tags.get("grpo.host") == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            log.warning(
                "MLflow run %s (%s) was left running by process %s, which is gone: marked KILLED",
                run.info.run_id,
                run.info.run_name,
                pid,
            )


def flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: Mapping[str, Any]) -> Iterator:
    """An MLflow run for one stage with ``sections`` (what the stage reads) logged as params."""
    setup(params)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"stage": stage, "pipeline": "prefect" if parent else "standalone", **owner_tags()}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=bool(parent), tags=tags) as run:
        dumped = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in sections.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(dumped).items()})
        yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric values of ``metrics`` (NaN dropped; "/" in names becomes ".")."""
    clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    mlflow.log_metrics(clean, step=step)


def active_run_id() -> str:
    return mlflow.active_run().info.run_id
