"""The pipeline operated as its users do, on a real Prefect server: `grpo-agents server start` (a
`prefect server start` on a free loopback port, the process work pool, the deployments of
prefect.yaml and a worker) in a temporary copy of the repo with the tiny models; runs triggered
through Prefect's REST API and run by the worker; artifacts read back; the schedule; promote and
rollback as deployments; `grpo-agents server stop`.

The tests share one stack and run in file order: the later ones use the registry versions the
first one creates."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import BIN, ROOT, dvc_status, make_project, mlflow_client, sh
from filelock import FileLock

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    project, env = make_project(tmp_path_factory.mktemp("stack"), tiny_model_dir)
    port = free_port()
    # The scheduler and the worker poll every 2 s instead of 60 s and 10 s: the test waits less.
    env = {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    out = sh([str(BIN / "grpo-agents"), "server", "start", "--port", str(port)], project, env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        yield project, env, api, out
    finally:
        print(sh([str(BIN / "grpo-agents"), "server", "stop"], project, env))
    status = subprocess.run([str(BIN / "grpo-agents"), "server", "status"], cwd=project, env=env, capture_output=True)
    assert status.returncode == 1
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still listens after `server stop`"


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """One REST call. A 503 (the server's SQLite database busy) is retried after a pause, as
    Prefect's own client and `curl --retry` do; any other error fails the test."""
    for _ in range(8):
        res = httpx.request(method, url, timeout=30, **kwargs)
        if res.status_code != 503:
            break
        time.sleep(float(res.headers.get("Retry-After") or 1))
    res.raise_for_status()
    return res


def deployment(api: str, name: str, flow: str = "grpo-pipeline") -> dict:
    return call("GET", f"{api}/deployments/name/{flow}/{name}").json()


def trigger(api: str, deployment_id: str, parameters: dict | None = None) -> str:
    """What the README's curl does: POST /api/deployments/{id}/create_flow_run."""
    return call(
        "POST", f"{api}/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters or {}}
    ).json()["id"]


def wait(api: str, run_id: str, timeout: float = 900, states: set[str] = TERMINAL) -> dict:
    """Poll the run until its state type is one of ``states`` (or it has finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = call("GET", f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in states | TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s: {run['state']}")


def logs(api: str, run_id: str, expect: str | None = None) -> str:
    """The run's log messages; with ``expect``, wait up to 60 s for a line containing it (a run's
    logs reach the API in batches, and may land after its final state)."""
    for _ in range(60):
        rows = call("POST", f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}).json()
        text = "\n".join(r["message"] for r in rows)
        if expect is None or re.search(expect, text):
            break
        time.sleep(1)
    return text


def artifacts(api: str, run_id: str) -> dict[str, str]:
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    return {a["key"]: a["data"] for a in call("POST", f"{api}/artifacts/filter", json=body).json()}


def test_server_start_prints_the_ui_the_deployments_and_a_working_curl(stack):
    project, env, api, out = stack
    assert f"Prefect UI:  {api.removesuffix('/api')}" in out and "stop:        grpo-agents server stop" in out
    for name in ("pipeline", "retrain", "promote-model", "rollback-model"):
        assert f"deployment:  {name}" in out
    pipeline = deployment(api, "pipeline")
    assert pipeline["work_pool_name"] == "grpo-agents" and pipeline["global_concurrency_limit"]["limit"] == 1
    assert f"{api}/deployments/{pipeline['id']}/create_flow_run" in out
    assert call("GET", api.removesuffix("/api")).status_code == 200  # the UI is served
    status = sh([str(BIN / "grpo-agents"), "server", "status"], project / "data", env)  # from a subdirectory
    assert "worker: up" in status


def readme_http_blocks() -> list[str]:
    """The bash blocks of the README's "Trigger a run over HTTP", as a user would paste them."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Trigger a run over HTTP") :].split("\n## ")[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def run_readme_block(block: str, api: str, env: dict, **variables: str) -> str:
    """Run a README block in bash, as a user would in a shell where the first block already ran
    (its `export PREFECT_API_URL` set to this server's API)."""
    block = block.replace("http://127.0.0.1:4200/api", api)  # the address `server start` printed here
    return sh(["bash", "-euo", "pipefail", "-c", block], ROOT, {**env, "PREFECT_API_URL": api, **variables})


def test_runs_triggered_over_rest_complete_one_at_a_time_and_publish_artifacts(stack):
    project, env, api, _ = stack
    pipeline = deployment(api, "pipeline")["id"]
    trigger_block, read_block = readme_http_blocks()
    printed = run_readme_block(trigger_block, api, env)  # the first run: the README's curl calls
    first = re.search(r"flow run ([0-9a-f-]{36}): http://", printed).group(1)
    wait(api, first, states={"RUNNING"}, timeout=300)
    # A second run, triggered while the first is running, with a params override: it must wait for
    # the first, then change params.yaml, rerun only what the change touches, and register v2.
    # (Fewer held-out scenarios: eval.json changes even when the trained policy equals the base.)
    second = trigger(api, pipeline, {"overrides": {"evaluate.max_scenarios": 6}})
    runs = [wait(api, first), wait(api, second)]
    for run in runs:
        assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']}\n{logs(api, run['id'])[-3000:]}"
    started, ended = (datetime.fromisoformat(runs[1]["start_time"]), datetime.fromisoformat(runs[0]["end_time"]))
    assert started >= ended, "the two pipeline runs overlapped"
    history = call("GET", f"{api}/flow_run_states/", params={"flow_run_id": second}).json()
    assert "AwaitingConcurrencySlot" in {s["name"] for s in history}  # it waited for the deployment's slot

    judge_line = r"judge: .* served on http://"  # grpo.judge, a stage's own logger
    assert re.search(judge_line, logs(api, first, judge_line))
    first_artifacts, second_artifacts = artifacts(api, first), artifacts(api, second)
    assert {"validation-summary", "evaluation", "registry-decision"} <= set(first_artifacts)
    assert "Great Expectations:" in first_artifacts["validation-summary"]
    assert "passed" in first_artifacts["validation-summary"]
    assert "grpo-agent version 1: promoted to champion" in first_artifacts["registry-decision"]
    # The second run changed only evaluate's params: prepare was skipped, evaluate and register ran.
    assert "validation-summary" not in second_artifacts and "evaluation" in second_artifacts
    assert "grpo-agent version 2" in second_artifacts["registry-decision"]
    latest = call("GET", f"{api}/artifacts/registry-decision/latest").json()
    assert latest["flow_run_id"] == second  # the stable key's latest version is the last run's
    printed = run_readme_block(read_block, api, env, RUN=first)  # the README's state and artifact reads
    assert printed.startswith("COMPLETED Completed\n") and "validation-summary\n" in printed
    assert "grpo-agent version 2" in printed  # registry-decision/latest

    assert "max_scenarios: 6" in (project / "params.yaml").read_text()
    assert "# The one source of configuration." in (project / "params.yaml").read_text()  # comments kept
    assert dvc_status(project, env) == {}
    client = mlflow_client(project)
    assert str(client.get_model_version_by_alias("grpo-agent", "champion").version) == "2"


def test_a_second_pipeline_run_is_refused_while_one_holds_the_project(stack):
    """The deployments queue their own runs; the flow's lock covers everything else: a run of the
    other deployment (retrain) or of the CLI while one is active."""
    project, env, api, _ = stack
    with FileLock(project / ".dvc/tmp/grpo-pipeline.lock", timeout=0):
        run = wait(api, trigger(api, deployment(api, "retrain")["id"]), timeout=300)
        assert run["state"]["type"] == "FAILED"
        assert "another grpo-pipeline run is active in" in logs(api, run["id"], "another grpo-pipeline run")
        res = subprocess.run(
            [str(BIN / "grpo-agents"), "run"],
            cwd=project,
            env={**env, "PREFECT_API_URL": api},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert res.returncode == 1
    assert "error: another grpo-pipeline run is active in" in res.stderr and "Traceback" not in res.stderr
    assert dvc_status(project, env) == {}


def test_schedules_create_runs_and_the_worker_runs_them(stack):
    project, env, api, _ = stack
    retrain = deployment(api, "retrain")
    assert [s["active"] for s in retrain["schedules"]] == [False]  # off by default

    def scheduled(deployment_id: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
        return [r for r in call("POST", f"{api}/flow_runs/filter", json=body).json() if r["auto_scheduled"]]

    print(sh([str(BIN / "grpo-agents"), "schedule", "on"], project, env))
    deadline = time.monotonic() + 120
    while not scheduled(retrain["id"]) and time.monotonic() < deadline:
        time.sleep(2)
    upcoming = scheduled(retrain["id"])
    assert upcoming, "no run was scheduled within 120 s of `grpo-agents schedule on`"
    for run in upcoming:  # the cron in its timezone: Mondays 03:00 in London
        start = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo("Europe/London"))
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0)
    sh([str(BIN / "grpo-agents"), "schedule", "off"], project, env)
    assert [s["active"] for s in deployment(api, "retrain")["schedules"]] == [False]

    # A short interval on the pipeline deployment: the scheduler creates a run and the worker runs
    # it to Completed (nothing is stale, so every stage is skipped).
    pipeline = deployment(api, "pipeline")["id"]
    anchor = (datetime.now(UTC) + timedelta(seconds=10)).isoformat()  # the first run is 10 s from now
    body = [{"schedule": {"interval": 3600, "anchor_date": anchor}, "active": True}]
    schedule = call("POST", f"{api}/deployments/{pipeline}/schedules", json=body).json()[0]
    try:
        deadline = time.monotonic() + 120
        while not scheduled(pipeline) and time.monotonic() < deadline:
            time.sleep(2)
        runs = sorted(scheduled(pipeline), key=lambda r: r["expected_start_time"])
        assert runs, "the interval schedule created no run"
        run = wait(api, runs[0]["id"], timeout=600)
        assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])[-3000:]
    finally:
        call("DELETE", f"{api}/deployments/{pipeline}/schedules/{schedule['id']}")
    assert dvc_status(project, env) == {}


def test_rollback_and_promote_run_as_deployments(stack):
    project, env, api, _ = stack
    client = mlflow_client(project)
    champion = lambda: str(client.get_model_version_by_alias("grpo-agent", "champion").version)
    assert champion() == "2"
    run = wait(api, trigger(api, deployment(api, "rollback-model", "rollback-model")["id"]), timeout=300)
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])[-3000:]
    assert champion() == "1"
    promote = deployment(api, "promote-model", "promote-model")["id"]
    run = wait(api, trigger(api, promote, {"version": "2"}), timeout=300)
    assert run["state"]["type"] == "COMPLETED", logs(api, run["id"])[-3000:]
    assert champion() == "2"
    assert client.get_model_version("grpo-agent", "2").tags["promotion.by"] == "prefect flow promote-model"
    # A refused promotion fails the flow run, and the champion stays.
    run = wait(api, trigger(api, promote, {"version": "99"}), timeout=300)
    assert run["state"]["type"] == "FAILED" and champion() == "2"
