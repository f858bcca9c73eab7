"""What every stage shares: params, paths, the MLflow tracking layer and the CLI wrapper."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import yaml

log = logging.getLogger("tasks")
PARAMS_FILE = Path("params.yaml")
PARENT_RUN_ENV = "GRPO_PARENT_RUN_ID"  # set by the Prefect flow so stage runs nest under it


def load_params(path: Path = PARAMS_FILE) -> dict:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: not found; run stages from the repository root") from None


def tracking_uri(params: dict) -> str:
    # Absolute: MLflow caches one store per URI string, so a relative one would stick to the first
    # directory it was resolved in.
    return f"sqlite:///{Path(params['paths']['mlflow_db']).resolve()}"


def setup_mlflow(params: dict):
    import mlflow

    Path(params["paths"]["mlflow_db"]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(params))
    name = params["mlflow"]["experiment"]
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(params["paths"]["mlflow_artifacts"]).resolve()
        mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(name)
    return mlflow


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict, sections: tuple[str, ...]) -> Iterator:
    """An MLflow run for one stage, nested under the pipeline's parent run when there is one,
    with the stage's params logged."""
    mlflow = setup_mlflow(params)
    parent = os.environ.get(PARENT_RUN_ENV)
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=bool(parent),
                          tags={"stage": stage, "pipeline": "prefect" if parent else "standalone"}) as run:
        logged = {}
        for s in sections:
            value = params[s]
            logged.update(flatten(value, f"{s}.") if isinstance(value, dict) else {s: value})
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        yield mlflow, run


def log_metrics(mlflow, metrics: dict, step: int | None = None) -> None:
    clean = {k.replace("/", "."): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v}  # drop NaN
    mlflow.log_metrics(clean, step=step)


def cli(entry: Callable[[dict], dict]) -> None:
    """Run a stage entry function from the command line: clear errors, non-zero exit."""
    import argparse

    module = sys.modules[entry.__module__]
    name = module.__spec__.name if module.__spec__ else entry.__module__  # "tasks.x", not "__main__"
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    try:
        summary = entry(load_params())
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError, FloatingPointError) as e:
        print(f"error: {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("%s done: %s", name, summary)
