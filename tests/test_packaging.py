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


def test_every_command_has_help():
    commands = parser()._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    assert set(commands) == {"run", "stage", "promote", "rollback", "serve", "chat"}
    for argv in [[], *([c] for c in commands)]:
        res = subprocess.run([str(BIN / "grpo-agents"), *argv, "--help"], capture_output=True, text=True, cwd="/")
        assert res.returncode == 0 and res.stdout.startswith("usage: grpo-agents"), (argv, res.stderr)


def test_commands_outside_the_repository_say_where_to_run_them():
    for command in ("run", "promote", "serve"):
        res = subprocess.run([str(BIN / "grpo-agents"), command], capture_output=True, text=True, cwd="/")
        assert res.returncode == 1 and "Traceback" not in res.stderr, (command, res.stderr[-2000:])
        assert "error: params.yaml: not found; run from the repository root" in res.stderr
