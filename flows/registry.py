"""Prefect flows for the registry: `promote-model` and `rollback-model` (wiring only; the logic is
in mlflow_io/registry.py, which the `grpo-agents promote` and `rollback` commands call too). Both
refresh paths.champion, so DVC sees the move."""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import flow

from grpo_agents.params import load_params
from mlflow_io import registry
from mlflow_io.tracking import setup


@flow(name="promote-model", log_prints=True)
def promote_model(version: str | None = None) -> dict:
    """Move `champion` to ``version`` (default: the challenger) if it passes the promotion gate; a
    refusal fails the run with the gate's reason (as `grpo-agents promote` exits 1)."""
    params = load_params()
    setup(params)
    client = MlflowClient()
    result = registry.promote_version(client, params.register, version, "prefect flow promote-model")
    registry.sync_champion(client, params.register.model_name, params.paths)
    print(result)
    if not result["promoted"]:
        raise registry.RegistryError(f"version {result['version']} not promoted: {result['reason']}")
    return result


@flow(name="rollback-model", log_prints=True)
def rollback_model() -> dict:
    """Restore the champion that the current champion replaced."""
    params = load_params()
    setup(params)
    client = MlflowClient()
    result = registry.rollback(client, params.register.model_name, "prefect flow rollback-model")
    registry.sync_champion(client, params.register.model_name, params.paths)
    print(result)
    return result
