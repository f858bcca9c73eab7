"""Disk full: a stage whose write fails midway leaves the previous version of its output intact.

The failure is the kernel's, not a mock: the stage runs with a file-size limit (RLIMIT_FSIZE, with
SIGXFSZ ignored) below the size of the model it writes, so the write fails partway through with
EFBIG, as it would with ENOSPC on a full disk."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

from conftest import make_project, sh

from grpo.io import tree_sha256

LIMIT = 4 << 20  # bytes: above what the stage writes before the model, below the 6 MB tiny model


def limited() -> None:  # in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_write_that_fails_midway_keeps_the_previous_version(tmp_path, tiny_model_dir):
    project, env = make_project(tmp_path, tiny_model_dir)
    stage = [sys.executable, "-m", "tasks.base_model"]
    sh(stage, project, env)
    out = project / "data/models/base"
    assert (out / "model.safetensors").stat().st_size > LIMIT  # so the next write cannot complete
    before = tree_sha256(out)
    res = subprocess.run(stage, cwd=project, env=env, capture_output=True, text=True, preexec_fn=limited)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "error: tasks.base_model:" in res.stderr and "File too large" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert tree_sha256(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["base"]  # no temporary left beside it
