"""What a user installs and runs first: the pins resolve off this machine, and the command line's
help is there for every command."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from grpo_agents.cli import parser

BIN = Path(sys.executable).parent


def test_constraints_pin_no_local_versions():
    """A local version such as torch==2.13.0+cpu exists only in one machine's wheel directory."""
    local = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if re.match(r"^[^#]+==\S+\+", line)]
    assert not local, local


def test_every_command_has_help_from_any_directory():
    commands = parser()._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    assert set(commands) == {"run", "stage", "server", "deploy", "schedule", "promote", "rollback", "serve", "chat"}
    top = subprocess.run([str(BIN / "grpo-agents"), "--help"], capture_output=True, text=True, cwd="/").stdout
    for command in commands:  # the overview lists every command, and every command's own help runs
        assert f"grpo-agents {command}" in top, command
        res = subprocess.run([str(BIN / "grpo-agents"), command, "--help"], capture_output=True, text=True, cwd="/")
        assert res.returncode == 0 and res.stdout.startswith(f"usage: grpo-agents {command}"), (command, res.stderr)


def test_commands_find_the_project_from_a_subdirectory_or_project_option():
    for cwd, argv in [(ROOT / "data" / "scenarios", []), ("/", ["--project", str(ROOT)])]:
        res = subprocess.run(
            [str(BIN / "grpo-agents"), *argv, "server", "status"], capture_output=True, text=True, cwd=cwd
        )
        assert res.returncode == 1 and res.stdout.startswith("not running"), (cwd, res.stdout, res.stderr)
    for command in ("run", "promote", "serve"):
        res = subprocess.run([str(BIN / "grpo-agents"), command], capture_output=True, text=True, cwd="/")
        assert res.returncode == 1 and "Traceback" not in res.stderr, (command, res.stderr[-2000:])
        assert "error: /: not inside a grpo-agents project (no params.yaml here or above)" in res.stderr


def test_make_takes_the_torch_build_from_one_variable():
    """CPU by default (PyTorch's CPU index: PyPI's Linux wheel is the CUDA build), CUDA on request."""

    def install_commands(*args: str) -> str:
        cmd = ["make", "-n", "-B", "-C", str(ROOT), ".venv/.installed", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    torch = [line for line in install_commands().splitlines() if "pip install" in line and "torch==" in line]
    assert torch and "--extra-index-url https://download.pytorch.org/whl/cpu" in torch[0]
    cuda = install_commands("TORCH_INDEX=https://download.pytorch.org/whl/cu128")
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in cuda
