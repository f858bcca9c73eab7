"""params.yaml as one typed model: the shipped file loads, and a mistake fails at load time with
the file, the key and what to write instead."""

import re
from pathlib import Path

import pytest
from conftest import ROOT, write_params

from grpo_agents.params import Params, load_params


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
