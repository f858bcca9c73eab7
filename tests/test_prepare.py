"""The prepare stage on the shipped seeds plus an import, and on a corpus of broken inputs: each is
rejected with a message naming the file (and the scenario and expectation where there is one), and
the previously prepared data is left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, write_params

from grpo import scenarios
from grpo_agents.stages import run_stage

GOOD = {
    "id": "x-new",
    "domain": "sales",
    "persona": "A buyer.",
    "goal": "Buy a plan.",
    "opening": "Which plan fits me?",
    "followups": ["We are five people."],
    "expected_behaviours": ["recommend a plan"],
    "difficulty": "easy",
}


def v2(*entries) -> str:
    return yaml.safe_dump({"schema_version": 2, "scenarios": list(entries)})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with the shipped seeds and a previously prepared output."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "data/scenarios", tmp_path / "data/scenarios")
    shutil.copytree(ROOT / "data/expectations", tmp_path / "data/expectations")
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.parquet").write_bytes(b"previous run")
    params = write_params(
        tmp_path / "params.yaml", {"paths.expectations": str(tmp_path / "data/expectations/scenarios.json")}
    )
    return tmp_path, params


TRUNCATED = (ROOT / "data/scenarios/sales.yaml").read_text()[:1000] + "\n  - [unclosed"
BROKEN = {
    "truncated YAML": ("bad.yaml", TRUNCATED, ["bad.yaml", "invalid YAML"]),
    "wrong type": (
        "bad.yaml",
        v2({**GOOD, "followups": "just one"}),
        ["bad.yaml", "x-new", "'followups'", "valid list"],
    ),
    "missing field": (
        "bad.yaml",
        v2({k: v for k, v in GOOD.items() if k != "goal"}),
        ["bad.yaml", "x-new", "missing field 'goal'"],
    ),
    "duplicate id": (
        "bad.yaml",
        v2({**GOOD, "id": "cs-late-order"}),
        ["expect_column_values_to_be_unique", "values [", "'cs-late-order'", "bad.yaml"],
    ),
    "empty turn": ("bad.yaml", v2({**GOOD, "followups": ["   "]}), ["min_turn_chars", "x-new", "bad.yaml"]),
    "unresolved tool": (
        "bad.yaml",
        v2({**GOOD, "tools": ["check_order_status"]}),
        ["n_unbacked_tools", "x-new", "bad.yaml"],
    ),
    "invalid UTF-8": ("bad.yaml", b"schema_version: 2\nscenarios:\n- id: caf\xe9\n", ["bad.yaml", "not valid UTF-8"]),
    "10 MB message": (
        "bad.yaml",
        v2({**GOOD, "opening": "help " * 2_000_000}),
        ["max_turn_chars", "x-new", "bad.yaml"],
    ),
    "empty file": ("bad.yaml", "", ["bad.yaml", "file is empty"]),
    "unknown domain": ("bad.yaml", v2({**GOOD, "domain": "space_travel"}), ["bad.yaml", "x-new", "'space_travel'"]),
    "old schema": ("bad.yaml", yaml.safe_dump([GOOD]), ["bad.yaml", "schema version 1", "Migrate"]),
}


def assert_untouched(root: Path):
    assert (root / "data/prepared/train.parquet").read_bytes() == b"previous run"
    assert sorted(p.name for p in (root / "data/prepared").iterdir()) == ["train.parquet"]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_input_is_rejected_by_name_and_nothing_is_lost(project, case):
    root, params = project
    name, content, expected = BROKEN[case]
    f = root / "data/scenarios" / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        run_stage("prepare", params)
    for part in expected:
        assert part in str(e.value), (part, str(e.value)[:2000])
    assert len(str(e.value)) < 3000  # a bad value is echoed clipped, never whole (the 10 MB case)
    assert_untouched(root)


def test_directory_without_files_and_unknown_import_role(project):
    root, params = project
    for f in (root / "data/scenarios").iterdir():
        f.unlink()
    with pytest.raises(scenarios.ScenarioError, match="no \\*.yaml scenario files"):
        run_stage("prepare", params)
    shutil.copytree(ROOT / "data/scenarios", root / "data/scenarios", dirs_exist_ok=True)
    (root / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    params.prepare.sources = [{"path": "chats.jsonl", "format": "jsonl", "domain": "sales"}]
    with pytest.raises(scenarios.ScenarioError, match="chats.jsonl: row 1: message 0 has unknown role 'wizard'"):
        run_stage("prepare", params)
    assert_untouched(root)


def test_cli_exits_non_zero_with_one_clear_line(project):
    root, _ = project
    (root / "data/scenarios/bad.yaml").write_text(v2({**GOOD, "followups": "just one"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRPO_PARENT_RUN_ID", None)
    res = subprocess.run(
        [sys.executable, "-m", "tasks.prepare"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "error: tasks.prepare:" in res.stderr and "bad.yaml: entry 0 (id 'x-new')" in res.stderr
    assert_untouched(root)


def test_shipped_set_with_an_import(project):
    """What the README tells a user: point prepare.sources at a JSONL of chats and run the stage."""
    root, params = project
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} about my bill, write to me at u{i}@mail.com"},
                {"role": "assistant", "content": "Let me check your bill."},
            ]
        }
        for i in range(3)
    ]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    params.prepare.sources = [{"path": "chats.jsonl", "format": "jsonl", "domain": "customer_service"}]
    summary = run_stage("prepare", params)
    train = pd.read_parquet(root / "data/prepared/train.parquet")
    evaluation = pd.read_parquet(root / "data/prepared/eval.parquet")
    assert summary["scenarios"] == len(train) + len(evaluation) >= 200
    assert summary["imported"] == 3 and summary["pii_masked_email"] == 3
    assert summary["near_duplicates_dropped"] > 0 and summary["multi_issue"] > 0
    assert scenarios.leaked_families(train, evaluation) == []
    assert set(evaluation["domain"]) == set(scenarios.DOMAINS)
    assert json.loads((root / "data/prepared/validation.json").read_text())["success"]
    report = json.loads((root / "data/prepared/report.json").read_text())
    assert len(report["dropped"]) == summary["near_duplicates_dropped"]
    assert not any("@" in t for t in pd.concat([train, evaluation])["opening"])
