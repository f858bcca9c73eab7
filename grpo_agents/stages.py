"""Running one pipeline stage, the same way for ``python -m tasks.<stage>`` (what ``dvc repro``
runs), ``grpo-agents stage`` and the Prefect flow.

A stage is the ``run`` function of ``tasks/<stage>.py``. Its parameters are named after the
params.yaml sections it reads, and it is given exactly those: the stage's MLflow run logs them,
and tests/test_flow_order.py checks that dvc.yaml lists them for the stage.

A stage that runs as several processes (train_policy with ``distributed.world_size`` > 1) starts
``python -m tasks.<stage>`` again under torchrun with :func:`launch_ranks`: the ranks get the very
sections the stage was given (a file named in ``GRPO_STAGE_SECTIONS``) and log to its MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the params model imports the whole library (torch, transformers, trl)
    from grpo_agents.params import Params

# The order of the DAG in dvc.yaml (tests/test_flow_order.py checks it).
STAGES = ("base_model", "prepare", "label", "train_reward", "calibrate", "sft", "train_policy", "evaluate", "register")
# Errors a stage raises for bad input, a failed check or the system (a missing file, a full disk):
# a message and exit 1, no traceback.
STAGE_ERRORS = (ValueError, KeyError, OSError, NotImplementedError, FloatingPointError, ChildProcessError)
SECTIONS_ENV = "GRPO_STAGE_SECTIONS"  # set by launch_ranks for the ranks it starts
log = logging.getLogger("tasks")
# The loggers the stages write to. The flow sends their records to Prefect (the run's logs in the UI)
# through PREFECT_LOGGING_EXTRA_LOGGERS, which `grpo-agents run` and prefect.yaml's job env set.
STAGE_LOGGERS = ("tasks", "grpo", "mlflow_io")


def entry(stage: str) -> Callable[..., dict]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return importlib.import_module(f"tasks.{stage}").run


def reads(stage: str) -> list[str]:
    """The params.yaml sections a stage reads: its entry function's parameter names."""
    return list(inspect.signature(entry(stage)).parameters)


def run_stage(stage: str, params: Params) -> dict:
    """Run ``stage`` with the sections it reads, in its own MLflow run."""
    from mlflow_io.tracking import stage_run

    sections = params.sections(reads(stage))
    if os.environ.get("RANK", "0") != "0":  # a rank of a torchrun started by hand: rank 0 tracks the run
        return entry(stage)(**sections)
    with stage_run(stage, params, sections):
        log.info("stage %s started", stage)
        return entry(stage)(**sections)


def launch_ranks(stage: str, world_size: int, sections: dict) -> None:
    """Run ``stage`` with ``sections`` as ``world_size`` torchrun processes; they log to the active
    MLflow run (the stage's own). Raises ``ChildProcessError`` when a rank fails."""
    import mlflow
    from pydantic import BaseModel

    dumped = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in sections.items()}
    run = mlflow.active_run()
    with tempfile.TemporaryDirectory(prefix=f"{stage}-ranks-") as tmp:
        path = os.path.join(tmp, "sections.json")
        with open(path, "w") as f:
            json.dump(dumped, f)
        env = {SECTIONS_ENV: path, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
        if run is not None:
            env["MLFLOW_RUN_ID"] = run.info.run_id
        # torchrun watches its workers: when one fails or is killed it stops the others, exits non-zero
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
        log.info("tasks.%s: starting %d ranks under torchrun", stage, world_size)
        code = subprocess.run([*cmd, "-m", f"tasks.{stage}"], env={**os.environ, **env}).returncode
    if code:
        raise ChildProcessError(
            f"torchrun with {world_size} processes exited with {code}: a rank failed or was killed (its "
            "error is above). The outputs are as they were; a rerun resumes from the last checkpoint."
        )


def run_rank(stage: str) -> dict:
    """One torchrun rank of ``stage``: the sections :func:`launch_ranks` wrote, validated with the
    params model's types; rank 0 logs to the launching stage's MLflow run."""
    from pydantic import TypeAdapter

    from grpo_agents.params import Params

    with open(os.environ[SECTIONS_ENV]) as f:
        raw = json.load(f)
    sections = {k: TypeAdapter(Params.model_fields[k].annotation).validate_python(v) for k, v in raw.items()}
    tracked = contextlib.nullcontext()
    if os.environ.get("RANK", "0") == "0" and "MLFLOW_RUN_ID" in os.environ:
        import mlflow

        tracked = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    with tracked:
        return entry(stage)(**sections)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def run_or_exit(stage: str) -> dict:
    """Run ``stage`` from params.yaml (or, in a rank :func:`launch_ranks` started, from the sections
    it was given); a stage error is printed and exits 1."""
    from grpo_agents.params import load_params

    setup_logging()
    try:
        summary = run_rank(stage) if SECTIONS_ENV in os.environ else run_stage(stage, load_params())
    except STAGE_ERRORS as e:
        print(f"error: tasks.{stage}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("tasks.%s done: %s", stage, summary)
    return summary


def main(stage: str) -> None:
    """``python -m tasks.<stage>``: the stage's docstring is its ``--help``."""
    module = sys.modules.get("__main__")
    argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}",
        description=getattr(module, "__doc__", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args()
    run_or_exit(stage)
