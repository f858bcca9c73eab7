"""grpo-agents: run the pipeline or one stage, operate it on a Prefect server, move the registry's
champion, serve an agent.

    grpo-agents run [--force] [--profile P] [--set KEY=VALUE ...]
                                       the Prefect flow: every stale stage in order, then a summary
    grpo-agents stage NAME             one stage, as `dvc repro` runs it (python -m tasks.NAME)
    grpo-agents server start|status|stop
                                       a local Prefect server, work pool, deployments and worker
    grpo-agents deploy                 (re)deploy prefect.yaml to the running server
    grpo-agents schedule on|off        resume or pause the scheduled `retrain` deployment
    grpo-agents promote [--version N]  move `champion` to a version that passes the promotion gate
    grpo-agents rollback               restore the champion that the current one replaced
    grpo-agents champion               show it; refresh the file through which DVC sees it
    grpo-agents serve [--alias A]      serve models:/<register.model_name>@<alias> over an OpenAI API
    grpo-agents chat [--alias A] [--scenario ID]
                                       talk to that model in the terminal, turn by turn (with a
                                       scenario's tools and backend)

Every command works on the project that holds the current directory (the nearest directory at or
above it with a params.yaml), or on --project DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from grpo_agents.stages import STAGE_LOGGERS, STAGES, run_or_exit, setup_logging


def find_project(start: Path) -> Path:
    """The nearest directory at or above ``start`` that holds a params.yaml."""
    for d in (start, *start.parents):
        if (d / "params.yaml").is_file():
            return d
    raise FileNotFoundError(
        f"{start}: not inside a grpo-agents project (no params.yaml here or above); "
        "cd into the repository or pass --project DIR"
    )


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(STAGE_LOGGERS))  # before Prefect is imported
    from flows.pipeline import PipelineBusy, apply_overrides, grpo_pipeline, project_lock, summary_text
    from grpo_agents.params import load_params, parse_overrides

    # A bad params.yaml, a bad --set or a busy project stops here with one line, before Prefect
    # starts; the overrides are written (validated, atomically) under the project's lock.
    try:
        with project_lock():
            apply_overrides(args.profile, parse_overrides(args.set or []))
    except PipelineBusy as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    grpo_pipeline(force=args.force, rollout_workers=args.rollout_workers, dask_address=args.dask_address)
    print(summary_text(load_params()))


def server(args: argparse.Namespace) -> None:
    from grpo_agents import stack

    if args.action == "start":
        state = stack.start(args.host, args.port)
        api = state["api_url"]
        api, ids = state["api_url"], state["deployments"]
        print(f"Prefect UI:  {state['ui_url']}")
        print(f"API:         {api}   (export PREFECT_API_URL={api} for the prefect CLI)")
        print(f"work pool:   {stack.POOL}, one process worker; logs in {stack.HOME}/")
        for name, deployment_id in ids.items():
            print(f"deployment:  {name:<15} {deployment_id}")
        print(
            f"trigger:     curl -s -X POST {api}/deployments/{ids.get('pipeline')}/create_flow_run "
            "-H 'Content-Type: application/json' -d '{}'"
        )
        print("stop:        grpo-agents server stop")
    elif args.action == "stop":
        stopped = stack.stop()["stopped"]
        print(f"stopped: {', '.join(stopped)}" if stopped else "no stack was running")
    else:
        state = stack.status()
        if not state["running"]:
            print("not running (start it with `grpo-agents server start`)")
            raise SystemExit(1)
        print(f"server: {state['ui_url']} (API {state['api_url']}); worker: {'up' if state['worker'] else 'down'}")


def deploy(args: argparse.Namespace) -> None:
    from grpo_agents import stack

    for name, deployment_id in stack.deploy().items():
        print(f"deployment:  {name:<15} {deployment_id}")


def schedule(args: argparse.Namespace) -> None:
    from grpo_agents import stack

    print(stack.schedule(args.state == "on").strip())


def registry(args: argparse.Namespace) -> None:
    """promote, rollback and champion: each ends by refreshing paths.champion, evaluate's DVC input."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from grpo_agents.params import load_params
    from mlflow_io.registry import RegistryError, by_alias, promote_version, rollback, sync_champion
    from mlflow_io.tracking import setup

    params = load_params()
    setup(params)
    client, name = MlflowClient(), params.register.model_name
    try:
        if args.command == "promote":
            result = promote_version(client, params.register, args.version, "cli promote")
        elif args.command == "rollback":
            result = rollback(client, name, "cli rollback")
        else:
            champion = by_alias(client, name, "champion")
            result = {"champion": str(champion.version) if champion else None}
        compared = sync_champion(client, name, params.paths)
    except (RegistryError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(result)
    print(
        f"evaluate compares against: {f'{name} v{compared}' if compared else 'no champion'} ({params.paths.champion})"
    )
    if args.command == "promote" and not result["promoted"]:
        raise SystemExit(1)


def serve(args: argparse.Namespace) -> None:
    """Serve /v1/chat/completions (streaming included), /v1/models, /health and /metrics, and reload
    the model when the alias moves, without dropping requests in flight."""
    import uvicorn
    from mlflow import MlflowClient

    from grpo.serving import create_app
    from grpo_agents.params import load_params
    from mlflow_io.registry import alias_loader, watch_alias
    from mlflow_io.tracking import setup

    params = load_params()
    config = params.serve
    setup(params)
    setup_logging()
    load, current_version, state = alias_loader(
        MlflowClient(), args.model_name or params.register.model_name, args.alias or config.alias, params.device
    )
    app = create_app(load, config.limits, os.environ.get(config.api_key_env) or None)
    threading.Thread(
        target=watch_alias, args=(app.state.server, current_version, state, config.poll_seconds), daemon=True
    ).start()
    uvicorn.run(app, host=args.host or config.host, port=args.port or config.port, log_level=logging.INFO)


def find_scenario(prepared: str, scenario_id: str):
    """A prepared scenario (train or eval set) by id."""
    import pandas as pd

    from grpo.scenarios import from_frame

    ids = []
    for name in ("train", "eval"):
        path = Path(prepared) / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run the prepare stage first")
        frame = pd.read_parquet(path)
        ids += frame["id"].tolist()
        match = frame[frame["id"] == scenario_id]
        if len(match):
            return from_frame(match)[0]
    raise ValueError(f"no scenario {scenario_id!r} in {prepared}; e.g. {', '.join(ids[:3])}")


MAX_TOOL_ROUNDS = 3  # replies in a row that may call a tool before the user must speak


def agent_turn(predict, messages: list[dict], scenario, backend: dict, say) -> None:
    """The agent answers ``messages`` (appended to them). With a ``scenario``, a reply that calls
    one of its tools is run against ``backend`` and the result given back as a ``tool`` message,
    as in training, and the agent speaks again (at most MAX_TOOL_ROUNDS calls)."""
    from grpo.tools import call_tool, parse_call

    for calls in range(MAX_TOOL_ROUNDS + 1):
        reply = predict(messages)
        messages.append({"role": "assistant", "content": reply})
        say(f"agent> {reply}")
        call = parse_call(reply) if scenario and scenario.tools and calls < MAX_TOOL_ROUNDS else None
        if call is None:
            return
        result, _ = call_tool(*call, scenario.tools, backend)
        messages.append({"role": "tool", "content": result})
        say(f"tool> {result}")


def chat(args: argparse.Namespace) -> None:
    """Talk to a registered agent in the terminal: each line you type is a user turn, the agent
    answers with the whole conversation so far. The model is the registered pyfunc itself, as
    `mlflow models serve` would run it. With --scenario, the conversation starts as that prepared
    scenario does (its system prompt, tools and opening message), and the agent's tool calls run
    against a copy of the scenario's backend. An empty line or Ctrl-D ends the chat."""
    import copy

    import mlflow
    import pandas as pd

    from grpo_agents.params import load_params
    from mlflow_io.tracking import setup

    params = load_params()
    scenario = find_scenario(params.paths.prepared, args.scenario) if args.scenario else None
    setup(params)
    uri = f"models:/{args.model_name or params.register.model_name}@{args.alias or params.serve.alias}"
    agent = mlflow.pyfunc.load_model(uri)
    print(f"chatting with {uri}; an empty line or Ctrl-D ends", flush=True)

    def predict(messages: list[dict]) -> str:
        return agent.predict(pd.DataFrame({"messages": [messages]}))[0]

    def say(line: str) -> None:
        print(line, flush=True)

    messages, backend = [], None
    if scenario:
        # the tools are declared in the system prompt as text, as for chat templates without tool support
        messages, backend = scenario.first_messages(declare_tools=True), copy.deepcopy(scenario.backend)
        say(f"scenario {scenario.id} ({scenario.domain}); tools: {', '.join(scenario.tools) or 'none'}")
        say(f"you> {scenario.opening}")
        agent_turn(predict, messages, scenario, backend, say)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        agent_turn(predict, messages, scenario, backend, say)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grpo-agents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ap.add_argument("--project", type=Path, help="the project directory (default: found from the current one)")
    p = sub.add_parser("run", help="run the pipeline as the Prefect flow (stale stages only)")
    p.add_argument("--force", action="store_true", help="run every stage even if DVC says it is up to date")
    p.add_argument("--profile", help="write this training profile into params.yaml first (see README 'Profiles')")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="write a params.yaml value first, as `dvc exp run -S` does (repeatable), e.g. train_policy.steps=4",
    )
    p.add_argument(
        "--rollout-workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="run label's and evaluate's rollouts as Prefect tasks on a local Dask cluster of N processes "
        "(default 1: one after another); the outputs are the same",
    )
    p.add_argument(
        "--dask-address",
        metavar="ADDR",
        help="run those rollouts on the existing Dask cluster at ADDR (e.g. tcp://scheduler:8786); its workers "
        "must see this project's files and have this package installed",
    )
    p.set_defaults(func=run)
    p = sub.add_parser("stage", help="run one stage with its params, in its own MLflow run")
    p.add_argument("name", choices=STAGES)
    p.set_defaults(func=lambda a: run_or_exit(a.name))
    p = sub.add_parser(
        "server",
        help="start, inspect or stop the local Prefect stack (server, work pool, deployments, worker)",
        description="start: `prefect server start` (SQLite in .prefect/), the process work pool, every "
        "deployment in prefect.yaml and a worker, in the background; logs in .prefect/. stop: the worker "
        "and the server. status: exit 1 when not running.",
    )
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, default=4200, help="default: 4200, Prefect's own")
    p.set_defaults(func=server)
    p = sub.add_parser("deploy", help="(re)create the work pool and every deployment in prefect.yaml")
    p.set_defaults(func=deploy)
    p = sub.add_parser("schedule", help="resume (on) or pause (off) the scheduled retrain deployment")
    p.add_argument("state", choices=["on", "off"])
    p.set_defaults(func=schedule)
    p = sub.add_parser("promote", help="move champion to a version that passes the gate; exit 1 if it does not")
    p.add_argument("--version", help="the version to promote (default: the challenger)")
    p.set_defaults(func=registry)
    p = sub.add_parser("rollback", help="restore the champion that the current one replaced")
    p.set_defaults(func=registry)
    p = sub.add_parser(
        "champion",
        help="show the champion and refresh the file that tells DVC which one evaluate compares against",
        description="Prints the champion, and writes paths.champion (a DVC input of evaluate) from the "
        "registry. promote, rollback, register and every flow run do this themselves; run it before "
        "`dvc repro` when the alias was moved some other way (the MLflow UI, another project).",
    )
    p.set_defaults(func=registry)
    p = sub.add_parser(
        "serve",
        help="serve a registered agent over an OpenAI-compatible API",
        description=f"{serve.__doc__} Defaults come from params.yaml `serve`; the optional bearer "
        "token is read from the environment variable named by `serve.api_key_env`.",
    )
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--alias", help="registry alias to serve (default: serve.alias)")
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.set_defaults(func=serve)
    p = sub.add_parser("chat", help="talk to a registered agent in the terminal", description=chat.__doc__)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--alias", help="registry alias to talk to (default: serve.alias)")
    p.add_argument("--scenario", metavar="ID", help="start as this prepared scenario does, with its tools and backend")
    p.set_defaults(func=chat)
    return ap


def main(argv: list[str] | None = None) -> None:
    from grpo_agents.stack import StackError

    args = parser().parse_args(argv)
    try:
        os.chdir(find_project((args.project or Path.cwd()).resolve()))
        args.func(args)
    except (ValueError, FileNotFoundError, StackError) as e:  # params.yaml missing or invalid, a stack step failed
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
