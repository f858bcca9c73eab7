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
    assert set(commands) == {
        "run",
        "stage",
        "server",
        "deploy",
        "schedule",
        "promote",
        "rollback",
        "champion",
        "serve",
        "chat",
    }
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


def test_run_refuses_a_bad_override_before_starting_and_leaves_params_alone(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for argv, message in [
        (
            ["--set", "train_policy.lerning_rate=0.1"],
            "train_policy.lerning_rate: unknown key; did you mean learning_rate?",
        ),
        (["--profile", "agressive"], "profile: 'agressive' is not one of profiles; did you mean aggressive?"),
        (["--set", "train_policy.steps"], "expected KEY=VALUE"),
    ]:
        res = subprocess.run([str(BIN / "grpo-agents"), "run", *argv], capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
