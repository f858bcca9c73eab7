"""grpo-agents: run the pipeline or one stage, move the registry's champion, serve an agent.

    grpo-agents run [--force]          the Prefect flow: every stale stage in order, then a summary
    grpo-agents stage NAME             one stage, as `dvc repro` runs it (python -m tasks.NAME)
    grpo-agents promote [--version N]  move `champion` to a version that passes the promotion gate
    grpo-agents rollback               restore the champion that the current one replaced
    grpo-agents serve [--alias A]      serve models:/<register.model_name>@<alias> over an OpenAI API
    grpo-agents chat [--alias A]       talk to that model in the terminal, turn by turn

Every command reads params.yaml in the current directory (the repository root).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from grpo_agents.params import load_params
from grpo_agents.stages import STAGES, run_or_exit, setup_logging


def run(args: argparse.Namespace) -> None:
    from flows.pipeline import grpo_pipeline, summary_text

    params = load_params()  # a bad params.yaml stops here, before Prefect starts
    grpo_pipeline(force=args.force)
    print(summary_text(params))


def promote_or_rollback(args: argparse.Namespace) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlflow_io.registry import RegistryError, promote_version, rollback
    from mlflow_io.tracking import setup

    params = load_params()
    setup(params)
    client = MlflowClient()
    try:
        if args.command == "promote":
            result = promote_version(client, params.register, args.version, "cli promote")
        else:
            result = rollback(client, params.register.model_name, "cli rollback")
    except (RegistryError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(result)
    if args.command == "promote" and not result["promoted"]:
        raise SystemExit(1)


def serve(args: argparse.Namespace) -> None:
    """Serve /v1/chat/completions (streaming included), /v1/models, /health and /metrics, and reload
    the model when the alias moves, without dropping requests in flight."""
    import uvicorn
    from mlflow import MlflowClient

    from grpo.serving import create_app
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


def chat(args: argparse.Namespace) -> None:
    """Talk to a registered agent in the terminal: each line you type is a user turn, the agent
    answers with the whole conversation so far. The model is the registered pyfunc itself, as
    `mlflow models serve` would run it. An empty line or Ctrl-D ends the chat."""
    import mlflow
    import pandas as pd

    from mlflow_io.tracking import setup

    params = load_params()
    setup(params)
    uri = f"models:/{args.model_name or params.register.model_name}@{args.alias or params.serve.alias}"
    agent = mlflow.pyfunc.load_model(uri)
    print(f"chatting with {uri}; an empty line or Ctrl-D ends", flush=True)
    messages = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = agent.predict(pd.DataFrame({"messages": [messages]}))[0]
        messages.append({"role": "assistant", "content": reply})
        print(f"agent> {reply}", flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grpo-agents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run the pipeline as the Prefect flow (stale stages only)")
    p.add_argument("--force", action="store_true", help="run every stage even if DVC says it is up to date")
    p.set_defaults(func=run)
    p = sub.add_parser("stage", help="run one stage with its params, in its own MLflow run")
    p.add_argument("name", choices=STAGES)
    p.set_defaults(func=lambda a: run_or_exit(a.name))
    p = sub.add_parser("promote", help="move champion to a version that passes the gate; exit 1 if it does not")
    p.add_argument("--version", help="the version to promote (default: the challenger)")
    p.set_defaults(func=promote_or_rollback)
    p = sub.add_parser("rollback", help="restore the champion that the current one replaced")
    p.set_defaults(func=promote_or_rollback)
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
    p.set_defaults(func=chat)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # params.yaml missing or invalid: the file and key named
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
