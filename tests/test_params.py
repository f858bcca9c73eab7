"""params.yaml as one typed model: the shipped file loads, and a mistake fails at load time with
the file, the key and what to write instead."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_params

from grpo_agents.params import Params, load_params, parse_overrides, set_params


def load_with(tmp_path: Path, overrides: dict) -> Params:
    write_params(tmp_path / "raw.yaml", {})  # the shipped file, unchanged
    text = (tmp_path / "raw.yaml").read_text()
    for key, value in overrides.items():  # raw text edits: write_params itself would refuse them
        text = re.sub(rf"(?m)^(\s*){key}:", rf"\g<1>{value}:", text, count=1)
    (tmp_path / "params.yaml").write_text(text)
    return load_params(tmp_path / "params.yaml")


def test_the_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.train_policy.seed == 0 and params.rollout.max_turns >= 1


def test_reading_params_and_the_registry_module_imports_no_torch():
    """grpo/config.py holds the typed configs apart from the torch code that takes them, so the
    registry commands (champion, promote, rollback) do not load torch, transformers or peft."""
    code = "import sys, grpo_agents.params, mlflow_io.registry; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_typo_names_the_file_the_key_and_the_closest_valid_names(tmp_path):
    with pytest.raises(ValueError) as e:
        load_with(tmp_path, {"max_new_tokens": "max_new_tokns"})
    assert str(e.value).startswith(f"{tmp_path / 'params.yaml'}: ")
    assert "rollout.max_new_tokns: unknown key; did you mean max_new_tokens?" in str(e.value)
    with pytest.raises(ValueError, match="tonez: unknown key; did you mean tones"):
        load_with(tmp_path, {"tones": "tonez"})  # a nested section: prepare.expand


def test_ranges_enums_and_cross_field_rules_fail_at_load(tmp_path):
    with pytest.raises(ValueError, match="train_policy.group_size: Input should be greater than or equal to 2"):
        write_params(tmp_path / "p.yaml", {"train_policy.group_size": 1})
    with pytest.raises(ValueError, match="calibrate.method: Input should be"):
        write_params(tmp_path / "p.yaml", {"calibrate.method": "robust"})
    with pytest.raises(ValueError, match=r"geometric needs every component in \[0, 1\]"):
        write_params(tmp_path / "p.yaml", {"reward.aggregate": "geometric", "calibrate.method": "zscore"})
    assert write_params(tmp_path / "p.yaml", {"reward.aggregate": "geometric", "calibrate.method": "minmax"})
    with pytest.raises(ValueError, match="GSPO"):
        write_params(
            tmp_path / "p.yaml",
            {"train_policy.turn_credit": True, "train_policy.importance_sampling_level": "sequence"},
        )
    with pytest.raises(ValueError, match="the seed is the top-level `seed`"):
        write_params(tmp_path / "p.yaml", {"train_policy.seed": 3})


def test_readme_parameter_table_lists_every_section():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| section | what it sets |") :].split("\n\n")[0]
    named = {
        name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z_]+)(?:\.[a-z_]+)?`", row.split("|")[1])
    }
    assert named == set(Params.model_fields)


def test_a_profile_fills_in_what_train_policy_leaves_null_and_explicit_values_win(tmp_path):
    shipped = load_params(ROOT / "params.yaml")
    assert shipped.profile == "balanced"
    for key, value in shipped.profiles["balanced"].model_dump().items():
        assert getattr(shipped.train_policy, key) == value, key
    aggressive = write_params(tmp_path / "p.yaml", {"profile": "aggressive"})
    assert aggressive.train_policy.learning_rate == aggressive.profiles["aggressive"].learning_rate
    assert aggressive.train_policy.group_size == aggressive.profiles["aggressive"].group_size
    mixed = write_params(tmp_path / "p.yaml", {"profile": "aggressive", "train_policy.learning_rate": 5e-5})
    assert mixed.train_policy.learning_rate == 5e-5 and mixed.train_policy.beta == mixed.profiles["aggressive"].beta
    with pytest.raises(ValueError, match="profile: 'agressive' is not one of profiles; did you mean aggressive"):
        write_params(tmp_path / "p.yaml", {"profile": "agressive"})
    with pytest.raises(ValueError, match="profiles.balanced.beta: Input should be greater than or equal to 0"):
        write_params(tmp_path / "p.yaml", {"profiles.balanced.beta": -1})


def test_set_params_keeps_comments_and_leaves_the_file_alone_when_refused(tmp_path):
    target = tmp_path / "params.yaml"
    write_params(target, {"train_policy.steps": 3})
    text = target.read_text()
    before, after = (ROOT / "params.yaml").read_text().splitlines(), text.splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and changed == [("  steps: null", "  steps: 3")]  # that line and no other
    with pytest.raises(ValueError, match="train_policy.steps: Input should be greater than or equal to 1"):
        set_params({"train_policy.steps": 0}, target)
    with pytest.raises(ValueError, match="train_polcy: no such section"):
        set_params({"train_polcy.steps": 2}, target)
    assert target.read_text() == text and not list(tmp_path.glob(".*.tmp"))
    assert parse_overrides(["train_policy.steps=4", "judge.base_url=null"]) == {
        "train_policy.steps": 4,
        "judge.base_url": None,
    }
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["train_policy.steps"])
