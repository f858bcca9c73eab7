"""The local Prefect stack of one project: `prefect server start` (SQLite), the process work pool,
the deployments of prefect.yaml and a worker, started and stopped together.

    grpo-agents server start [--host H] [--port P]   start them all; prints the UI and API addresses
    grpo-agents server status                        what is running, and where
    grpo-agents server stop                          stop the worker and the server
    grpo-agents deploy                               (re)create the pool and the deployments
    grpo-agents schedule on|off                      resume or pause the `retrain` schedule

Everything runs on Prefect's own commands (`prefect server start`, `prefect deploy`, `prefect
worker start`) and its client, which retries what the server answers with 503 (SQLite busy); this
module only starts them in order, waits until each is ready, and keeps their process ids and logs
in `.prefect/` (the stack's PREFECT_HOME, git-ignored), so `stop` finds them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

HOME = Path(".prefect")  # PREFECT_HOME of the stack: the SQLite database, logs, stack.json
STATE = HOME / "stack.json"
POOL = "grpo-agents"  # the process work pool prefect.yaml's deployments use
RETRAIN = "grpo-pipeline/retrain"  # the scheduled deployment, paused until `grpo-agents schedule on`
PREFECT = [sys.executable, "-m", "prefect"]


class StackError(RuntimeError):
    """A step of the stack failed; the message says which and where its log is."""


def read_state() -> dict | None:
    return json.loads(STATE.read_text()) if STATE.exists() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def api_url() -> str:
    """The API of the running stack, else PREFECT_API_URL; a clear error when there is neither."""
    state = read_state()
    if state and alive(state["server_pid"]):
        return state["api_url"]
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    raise StackError("no Prefect server: start one with `grpo-agents server start` (or set PREFECT_API_URL)")


def env(api: str) -> dict[str, str]:
    """What Prefect's commands run with: this stack's home and API, and the project directory that
    prefect.yaml's deployments change into before a run (GRPO_AGENTS_PROJECT)."""
    return {
        **os.environ,
        "PREFECT_HOME": str(HOME.resolve()),
        "PREFECT_API_URL": api,
        "GRPO_AGENTS_PROJECT": str(Path.cwd()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def prefect(args: list[str], api: str, what: str) -> str:
    """Run one `prefect` command; a failure raises with its output."""
    res = subprocess.run([*PREFECT, "--no-prompt", *args], env=env(api), capture_output=True, text=True)
    if res.returncode != 0:
        raise StackError(f"{what} failed (prefect {' '.join(args)}):\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout


@contextmanager
def client(api: str):
    """Prefect's own (sync) API client for ``api``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        yield c


def wait_for(check, what: str, timeout: float, log: Path | None = None, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what}: the process exited with code {proc.returncode}; see {log}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StackError(f"{what}: not ready after {timeout:.0f} s; see {log}" if log else f"{what}: timed out")


def spawn(args: list[str], api: str, log: Path):
    """Start a long-running prefect command in its own process group, its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*PREFECT, *args], env=env(api), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def deploy(api: str | None = None) -> dict[str, str]:
    """Create the process work pool if missing, then every deployment in prefect.yaml; returns
    each deployment's name and id."""
    api = api or api_url()
    if not Path("prefect.yaml").exists():
        raise StackError(f"{Path.cwd()}: no prefect.yaml; run from the project root")
    with client(api) as c:
        pools = {p.name for p in c.read_work_pools()}
    if POOL not in pools:
        prefect(["work-pool", "create", POOL, "--type", "process"], api, f"creating work pool {POOL}")
    prefect(["deploy", "--all"], api, "prefect deploy --all")
    with client(api) as c:
        return {d.name: str(d.id) for d in sorted(c.read_deployments(), key=lambda d: d.name)}


def start(host: str, port: int) -> dict:
    state = read_state()
    if state and alive(state["server_pid"]):
        raise StackError(f"the stack is already running: UI {state['ui_url']} (stop it with `grpo-agents server stop`)")
    stop()  # what a crashed stack left behind: a worker whose server died, a stale stack.json
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise StackError(f"{host}:{port} is in use; pick another port with --port")
    HOME.mkdir(exist_ok=True)
    api, ui = f"http://{host}:{port}/api", f"http://{host}:{port}"
    server_log, worker_log = HOME / "server.log", HOME / "worker.log"
    print(f"starting prefect server on {ui} (log {server_log}) ...", flush=True)
    server = spawn(["server", "start", "--host", host, "--port", str(port)], api, server_log)
    state = {"api_url": api, "ui_url": ui, "server_pid": server.pid, "worker_pid": None}
    STATE.write_text(json.dumps(state))
    try:
        wait_for(
            lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200, "prefect server", 180, server_log, server
        )
        print(f"deploying prefect.yaml to work pool {POOL} ...", flush=True)
        deployments = deploy(api)
        print(f"starting a process worker on {POOL} (log {worker_log}) ...", flush=True)
        worker = spawn(["worker", "start", "--pool", POOL, "--type", "process"], api, worker_log)
        state["worker_pid"] = worker.pid
        STATE.write_text(json.dumps(state))
        with client(api) as c:
            wait_for(lambda: c.read_workers_for_work_pool(POOL), "prefect worker", 120, worker_log, worker)
    except BaseException:
        stop()
        raise
    return {**state, "deployments": deployments}


def stop() -> dict:
    """Stop the worker, then the server (SIGTERM to each process group, SIGKILL after 30 s)."""
    state = read_state()
    if not state:
        return {"stopped": []}
    stopped = []
    for role in ("worker_pid", "server_pid"):
        pid = state.get(role)
        if not pid or not alive(pid):
            continue
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if alive(pid):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stopped.append(role.removesuffix("_pid"))
    STATE.unlink(missing_ok=True)
    return {"stopped": stopped}


def _reap(pid: int) -> None:
    """Collect a child that has exited (when this process started it), so it stops being 'alive'."""
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status() -> dict:
    state = read_state()
    if not state:
        return {"running": False}
    try:
        healthy = httpx.get(f"{state['api_url']}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        healthy = False
    worker = bool(state.get("worker_pid")) and alive(state["worker_pid"])
    return {**state, "running": healthy, "server": healthy, "worker": worker}


def schedule(on: bool) -> str:
    """Resume (on) or pause (off) every schedule of the `retrain` deployment (`prefect deployment
    schedule resume` wants each schedule's id)."""
    from prefect.exceptions import ObjectNotFound

    api, lines = api_url(), []
    with client(api) as c:
        try:
            deployment = c.read_deployment_by_name(RETRAIN)
        except ObjectNotFound:
            raise StackError(f"no deployment {RETRAIN} on {api}: run `grpo-agents deploy`") from None
        for item in deployment.schedules:
            c.update_deployment_schedule(deployment.id, item.id, active=on)
            when = getattr(item.schedule, "cron", None) or item.schedule
            zone = getattr(item.schedule, "timezone", None) or "UTC"
            lines.append(f"{RETRAIN} schedule {when} ({zone}): {'on' if on else 'off'}")
    return "\n".join(lines) or f"{RETRAIN} has no schedules"
