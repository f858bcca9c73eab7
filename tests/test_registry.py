"""Promotion gate and rollback on real registered MLflow model versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import write_params
from mlflow.pyfunc import PythonModel

from grpo.io import tree_sha256
from grpo_agents.params import load_params
from mlflow_io import registry
from mlflow_io.tracking import setup

BIN = Path(sys.executable).parent
NAME = "agent-under-test"


class Echo(PythonModel):
    def predict(self, context, model_input, params=None):
        return list(model_input["messages"])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A params.yaml and an empty SQLite registry in a temporary directory, used as the cwd."""
    params = write_params(tmp_path / "params.yaml", {"register.model_name": NAME})
    monkeypatch.chdir(tmp_path)
    setup(params)
    yield tmp_path, mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def register(client, score: float, ci_low: float | None = None, flagged: bool = False, paired: bool = True) -> str:
    """A real logged-and-registered model version. The test sets only its evaluation metrics, as the
    register stage would from eval.json: the paired difference to the current champion is the score
    difference, with a CI whose lower end is half of it unless given."""
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="m", python_model=Echo(), registered_model_name=NAME, pip_requirements=["mlflow"]
        )
    version = str(info.registered_model_version)
    tags = {
        "eval.reward_mean": score,
        "eval.vs_base.mean": 0.2,
        "eval.vs_base.ci_low": 0.1,
        "eval.flagged": str(flagged).lower(),
    }
    current = registry.by_alias(client, NAME, "champion")
    if current is not None and paired:
        diff = score - float(current.tags["eval.reward_mean"])
        tags.update(
            {
                "eval.vs_champion.version": current.version,
                "eval.vs_champion.mean": diff,
                "eval.vs_champion.ci_low": diff / 2 if ci_low is None else ci_low,
            }
        )
    for k, v in tags.items():
        client.set_model_version_tag(NAME, version, k, str(v))
    client.set_registered_model_alias(NAME, "challenger", version)
    return version


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_worse_challenger_is_refused_and_rollback_restores_the_previous_champion(project):
    _, client = project
    v1 = register(client, 0.50)
    assert registry.promote(client, NAME, v1, "reward_mean", 0.0, "test")["promoted"]
    assert champion(client) == v1
    again = registry.promote(client, NAME, v1, "reward_mean", 0.0, "again")  # nothing to decide: nothing recorded
    assert not again["promoted"] and "already the champion" in again["reason"]
    assert client.get_model_version(NAME, v1).tags["promotion.by"] == "test"

    v2 = register(client, 0.30)  # worse than the champion
    res = registry.promote(client, NAME, v2, "reward_mean", 0.0, "test")
    assert not res["promoted"] and "refused" in res["reason"] and champion(client) == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.by"] == "test"

    v3 = register(client, 0.55)  # better, but not by the margin
    assert not registry.promote(client, NAME, v3, "reward_mean", 0.1, "test")["promoted"]
    assert registry.promote(client, NAME, v3, "reward_mean", 0.01, "test")["promoted"]
    assert champion(client) == v3
    assert client.get_model_version(NAME, v1).tags["previous_champion"] == "true"
    assert client.get_model_version(NAME, v3).tags["promotion.replaced"] == v1

    assert registry.rollback(client, NAME, "test") == {"champion": v1, "rolled_back": v3}
    assert champion(client) == v1 and client.get_model_version(NAME, v3).tags["rolled_back"] == "true"
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(client, NAME, "test")


def test_gate_needs_a_ci_above_zero_an_unflagged_run_and_a_paired_evaluation(project):
    _, client = project
    v1 = register(client, 0.5)
    assert registry.promote(client, NAME, v1, "reward_mean", 0.0, "test")["promoted"]
    noisy = register(client, 0.7, ci_low=-0.05)  # better on average, but the CI includes zero
    res = registry.promote(client, NAME, noisy, "reward_mean", 0.0, "test")
    assert not res["promoted"] and "CI low -0.0500" in res["reason"]
    assert registry.promote(client, NAME, noisy, "reward_mean", 0.0, "test", require_ci=False)["promoted"]
    registry.rollback(client, NAME, "test")
    flagged = register(client, 0.9, flagged=True)
    client.set_model_version_tag(NAME, flagged, "eval.flags", "reply length changed by a factor of 2.10")
    res = registry.promote(client, NAME, flagged, "reward_mean", 0.0, "test", require_ci=False)
    assert not res["promoted"] and "flagged: reply length" in res["reason"]
    unpaired = register(client, 0.9, paired=False)
    res = registry.promote(client, NAME, unpaired, "reward_mean", 0.0, "test")
    assert not res["promoted"] and "no paired evaluation" in res["reason"] and champion(client) == v1


def test_cli_refuses_a_worse_challenger_with_exit_1_and_rolls_back(project):
    cwd, client = project

    def run(*args):
        return subprocess.run([str(BIN / "grpo-agents"), *args], cwd=cwd, capture_output=True, text=True)

    assert run("rollback").returncode == 1  # no champion yet: a clear error, no traceback
    v1 = register(client, 0.5)
    assert run("promote").returncode == 0 and champion(client) == v1
    register(client, 0.2)
    refused = run("promote")
    assert refused.returncode == 1 and "refused" in refused.stdout
    v3 = register(client, 0.9)
    assert run("promote", "--version", v3).returncode == 0 and champion(client) == v3
    rb = run("rollback")
    assert rb.returncode == 0 and champion(client) == v1, rb.stderr
    assert json.loads((cwd / "mlflow/champion.json").read_text()) == {"model_name": NAME, "version": v1}
    shown = run("champion")
    assert shown.returncode == 0 and f"evaluate compares against: {NAME} v{v1}" in shown.stdout
    err = run("rollback")
    assert err.returncode == 1 and "error:" in err.stderr and "Traceback" not in err.stderr


def test_prefect_flows_wire_the_same_functions(project):
    from flows.registry import promote_model, rollback_model

    _, client = project
    v1 = register(client, 0.5)
    assert promote_model.fn()["promoted"]
    v2 = register(client, 0.7)
    assert promote_model.fn(v2)["replaced"] == v1
    assert rollback_model.fn()["champion"] == v1


def test_evaluate_compares_against_the_champion_this_policy_did_not_become(project):
    """paths.champion, evaluate's DVC input: the champion, or, when the champion is this workspace's
    own policy (it promoted itself), the version it replaced; rewritten only when that changes."""
    _, client = project
    paths = load_params().paths
    policy, file = Path(paths.policy), Path(paths.champion)
    policy.mkdir(parents=True)
    (policy / "model.safetensors").write_bytes(b"trained weights")

    assert registry.sync_champion(client, NAME, paths) is None
    assert json.loads(file.read_text()) == {"model_name": NAME, "version": None}
    v1 = register(client, 0.5)  # some other policy
    registry.promote(client, NAME, v1, "reward_mean", 0.0, "test")
    assert registry.sync_champion(client, NAME, paths) == v1
    v2 = register(client, 0.7)  # this workspace's policy, evaluated against v1
    client.set_model_version_tag(NAME, v2, "policy_sha256", tree_sha256(policy))
    assert registry.promote(client, NAME, v2, "reward_mean", 0.0, "test")["promoted"]
    stamp = file.stat().st_mtime_ns
    assert registry.sync_champion(client, NAME, paths) == v1  # not v2: that would be itself
    assert file.stat().st_mtime_ns == stamp  # unchanged content is not rewritten: DVC sees no change

    # A rolled-back version stays out until a person promotes it again.
    registry.rollback(client, NAME, "test")
    auto = registry.promote(client, NAME, v2, "reward_mean", 0.0, "register stage", automatic=True)
    assert not auto["promoted"] and "was rolled back" in auto["reason"] and champion(client) == v1
    assert registry.promote(client, NAME, v2, "reward_mean", 0.0, "by hand")["promoted"]
    assert "rolled_back" not in client.get_model_version(NAME, v2).tags

    (policy / "model.safetensors").write_bytes(b"retrained weights")  # champion v2 is no longer this policy
    assert registry.sync_champion(client, NAME, paths) == v2
    assert json.loads(file.read_text())["version"] == v2
