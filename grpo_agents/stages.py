"""Running one pipeline stage, the same way for ``python -m tasks.<stage>`` (what ``dvc repro``
runs), ``grpo-agents stage`` and the Prefect flow.

A stage is the ``run`` function of ``tasks/<stage>.py``. Its parameters are named after the
params.yaml sections it reads, and it is given exactly those: the stage's MLflow run logs them,
and tests/test_flow_order.py checks that dvc.yaml lists them for the stage.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the params model imports the whole library (torch, transformers, trl)
    from grpo_agents.params import Params

# The order of the DAG in dvc.yaml (tests/test_flow_order.py checks it).
STAGES = ("base_model", "prepare", "label", "train_reward", "calibrate", "train_policy", "evaluate", "register")
# Errors a stage raises for bad input or a failed check: a message and exit 1, no traceback.
STAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, NotImplementedError, FloatingPointError)
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
    with stage_run(stage, params, sections):
        return entry(stage)(**sections)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def run_or_exit(stage: str) -> dict:
    """Run ``stage`` from params.yaml; a stage error is printed and exits 1."""
    from grpo_agents.params import load_params

    setup_logging()
    try:
        summary = run_stage(stage, load_params())
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
