"""Serve a registered agent over an OpenAI-compatible API (a service command, not a DVC stage).

    python -m tasks.serve                       # models:/<register.model_name>@champion
    python -m tasks.serve --alias challenger --port 8001

Resolves ``models:/<name>@<alias>`` in the MLflow registry, serves ``/v1/chat/completions``
(streaming included), ``/v1/models``, ``/health`` and ``/metrics``, and reloads the model when the
alias moves to another version, without dropping requests in flight. Settings live in params.yaml
(`serve`); the optional bearer token is read from the environment variable named by
`serve.api_key_env`.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time

from tasks.common import load_params, setup_mlflow

log = logging.getLogger("tasks.serve")


def make_loader(params: dict, name: str, alias: str):
    """A ``load()`` for the server: resolves the alias now and loads that version's policy."""
    mlflow = setup_mlflow(params)
    client = mlflow.MlflowClient()
    state = {"version": None}

    def current_version() -> str:
        return str(client.get_model_version_by_alias(name, alias).version)

    def load():
        from grpo.models import load_causal_lm, load_tokenizer, pick_device

        from tasks.registry import download_policy

        version = current_version()
        policy = download_policy(mlflow, name, version)
        state["version"] = version
        log.info("loaded %s version %s (alias %s)", name, version, alias)
        return load_causal_lm(policy, pick_device(params["device"])), load_tokenizer(policy), f"{name}@{alias}:v{version}"

    return load, current_version, state


def watch_alias(server, current_version, state, every: float) -> None:
    while True:
        time.sleep(every)
        try:
            if current_version() != state["version"]:
                server.reload()
        except Exception:  # a registry hiccup must not kill the watcher; logged, retried next tick
            log.exception("alias check failed")


def main() -> None:
    import uvicorn

    from grpo.serving import Limits, create_app

    params = load_params()
    p = params["serve"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-name", default=params["register"]["model_name"])
    ap.add_argument("--alias", default=p["alias"])
    ap.add_argument("--host", default=p["host"])
    ap.add_argument("--port", type=int, default=p["port"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    load, current_version, state = make_loader(params, args.model_name, args.alias)
    app = create_app(load, Limits(**p["limits"]), os.environ.get(p["api_key_env"]) or None)
    threading.Thread(target=watch_alias, args=(app.state.server, current_version, state, p["poll_seconds"]),
                     daemon=True).start()
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
