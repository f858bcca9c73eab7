"""Prefect flows for the registry: `promote-model` and `rollback-model` (wiring only; the logic is
in tasks/registry.py, which is also the plain CLI)."""

from __future__ import annotations

from prefect import flow

from tasks import registry
from tasks.common import load_params, setup_mlflow


@flow(name="promote-model", log_prints=True)
def promote_model(version: str | None = None) -> dict:
    """Move `champion` to ``version`` (default: the challenger) if it passes the promotion gate."""
    params = load_params()
    client = setup_mlflow(params).MlflowClient()
    name, p = params["register"]["model_name"], params["register"]
    version = registry.version_or_challenger(client, name, version)
    result = registry.promote(client, name, version, p["metric"], p["min_improvement"], "prefect flow promote-model", p["require_ci"])
    print(result)
    return result


@flow(name="rollback-model", log_prints=True)
def rollback_model() -> dict:
    """Restore the champion that the current champion replaced."""
    params = load_params()
    result = registry.rollback(setup_mlflow(params).MlflowClient(), params["register"]["model_name"],
                               "prefect flow rollback-model")
    print(result)
    return result
