from pathlib import Path

import pytest
import yaml

from grpo import expand, scenarios
from grpo.validation import ValidationFailed, validate

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "data/expectations/scenarios.json"
BASE = {
    "id": "a",
    "domain": "sales",
    "persona": "A buyer.",
    "goal": "Buy a plan.",
    "opening": "Which plan?",
    "expected_behaviours": ["recommend a plan"],
}


def write(tmp_path, content) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return f


def test_seed_files_cover_every_domain_and_pass_validation():
    scen = scenarios.load_dir(ROOT / "data/scenarios")
    counts = {d: sum(s.domain == d for s in scen) for d in scenarios.DOMAINS}
    assert all(n >= 10 for n in counts.values()), counts
    assert sum(bool(s.tools) for s in scen) >= 10
    report = validate(scenarios.to_frame(scen), SUITE)
    assert report["success"] and report["evaluated"] >= 15


def test_validation_names_ids_files_and_expectations():
    df = scenarios.to_frame(scenarios.load_dir(ROOT / "data/scenarios"))
    df.loc[1, "id"] = df.loc[0, "id"]
    df.loc[2, "domain"] = "cooking"
    df.at[3, "followups"] = ["  "]
    df.at[5, "tools"] = ["teleport"]
    df.at[6, "tools"] = ["lookup_account"]  # its backend has no accounts table
    df.at[7, "expected_behaviours"], df.at[7, "example_responses"] = [], []
    with pytest.raises(ValidationFailed) as e:
        validate(df, SUITE)
    failed = {(f["expectation"], f["column"]): f for f in e.value.report["failures"]}
    assert df.loc[0, "id"] in failed["expect_column_values_to_be_unique", "id"]["ids"]
    assert failed["expect_column_values_to_be_in_set", "domain"]["ids"] == [df.loc[2, "id"]]
    assert failed["expect_column_values_to_be_between", "min_turn_chars"]["ids"] == [df.loc[3, "id"]]
    assert failed["expect_column_values_to_be_between", "n_unknown_tools"]["ids"] == [df.loc[5, "id"]]
    assert failed["expect_column_values_to_be_between", "n_unbacked_tools"]["ids"] == [df.loc[6, "id"]]
    assert failed["expect_column_values_to_be_between", "n_expected"]["ids"] == [df.loc[7, "id"]]
    assert "customer_service.yaml" in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ("schema_version: 2\nscenarios:\n- id: a\n  domain: [unclosed", "invalid YAML"),
        ("- id: a\n", "schema version 1"),
        ({"schema_version": 3, "scenarios": []}, "schema_version 3 is not supported"),
        ({"schema_version": 2, "scenarios": [{"id": "a", "domain": "sales"}]}, "missing field 'persona'"),
        (
            {"schema_version": 2, "scenarios": [{**BASE, "followups": "nope"}]},
            "field 'followups': Input should be a valid list",
        ),
        (
            {"schema_version": 2, "scenarios": [{**BASE, "opening": 42}]},
            "field 'opening': Input should be a valid string (got int)",
        ),
        ({"schema_version": 2, "scenarios": [{**BASE, "colour": "red"}]}, "unknown field 'colour'"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, content, message):
    f = write(tmp_path, content)
    with pytest.raises(scenarios.ScenarioError) as e:
        scenarios.load_dir(tmp_path)
    assert str(f) in str(e.value) and message in str(e.value)


def test_invalid_utf8_and_empty_directory(tmp_path):
    with pytest.raises(scenarios.ScenarioError, match="no \\*.yaml"):
        scenarios.load_dir(tmp_path)
    (tmp_path / "x.yaml").write_bytes(b"schema_version: 2\nscenarios:\n- id: \xff\xfe\n")
    with pytest.raises(scenarios.ScenarioError, match="not valid UTF-8"):
        scenarios.load_dir(tmp_path)


def test_frame_roundtrip_keeps_lists_and_backend():
    scen = scenarios.load_dir(ROOT / "data/scenarios")
    assert scenarios.from_frame(scenarios.to_frame(scen)) == scen


def shipped(seed=7):
    seeds = scenarios.load_dir(ROOT / "data/scenarios")
    return seeds, expand.expand(seeds, seed, tones=5, order_states=2, products=3)


def test_expansion_is_deterministic_and_keeps_families():
    seeds, a = shipped()
    _, b = shipped()
    assert [s.model_dump() for s in a] == [s.model_dump() for s in b]
    assert [s.id for s in shipped(8)[1]] != [s.id for s in a]
    assert len({s.id for s in a}) == len(a)
    seed_ids = {s.id for s in seeds}
    assert all(s.family in seed_ids for s in a)
    states = [s for s in a if any(t.startswith("order-state:") for t in s.tags)]
    assert states and all(s.backend != next(x for x in seeds if x.id == s.family).backend for s in states)
    products = [s for s in a if any(t.startswith("product:") for t in s.tags)]
    assert products and all(s.tags[-1].split(":")[1].replace("-", " ") in s.opening for s in products)
    assert all(s.backend["orders"][k]["items"][0] in s.opening for s in products for k in s.backend["orders"])


def test_split_stratified_deterministic_and_no_family_on_both_sides():
    _, scen = shipped()
    df = scenarios.to_frame(scen)
    train, ev = scenarios.split(df, 0.25, seed=7)
    train2, ev2 = scenarios.split(df.sample(frac=1, random_state=1), 0.25, seed=7)
    assert sorted(ev["id"]) == sorted(ev2["id"])
    assert len(train) + len(ev) == len(df) and scenarios.leaked_families(train, ev) == []
    assert set(ev["domain"]) == set(scenarios.DOMAINS) and set(ev["difficulty"]) == set(scenarios.DIFFICULTIES)
    assert sorted(scenarios.split(df, 0.25, seed=8)[1]["id"]) != sorted(ev["id"])


def test_leak_check_catches_a_family_on_both_sides_including_multi_issue():
    _, scen = shipped()
    train, ev = scenarios.split(scenarios.to_frame(scen), 0.25, seed=7)
    moved = train.iloc[:1].assign(id="moved-copy")
    assert scenarios.leaked_families(train, moved) == [moved.iloc[0]["family"]]
    pair = expand.multi_issue(scenarios.from_frame(train), 7, 1)[0]
    assert pair.family.split("+")[0] in set(train["family"])
    assert scenarios.leaked_families(train, scenarios.to_frame([pair])) == sorted(pair.family.split("+"))


def test_near_duplicates_are_dropped_and_different_backends_kept():
    import numpy as np

    seeds = scenarios.load_dir(ROOT / "data/scenarios")[:3]
    copy = seeds[0].model_copy(update={"id": "copy", "opening": seeds[0].opening + "!"})
    other_state = expand.order_state_variant(seeds[0], "shipped")
    vocab = sorted({w for s in [*seeds, copy] for w in expand.dialogue_text(s).lower().split()})

    def bag_of_words(texts):
        return np.array([[t.lower().split().count(w) for w in vocab] for t in texts], dtype=float)

    kept, dropped = expand.near_duplicates([*seeds, copy, other_state], bag_of_words, 0.95)
    assert [s.id for s in kept] == [*(s.id for s in seeds), other_state.id]
    assert dropped[0]["dropped"] == "copy" and dropped[0]["kept"] == seeds[0].id


def test_subsample_is_fixed_and_domain_balanced():
    _, scen = shipped()
    a, b = scenarios.subsample(scen, 20, 7), scenarios.subsample(list(reversed(scen)), 20, 7)
    assert [s.id for s in a] == [s.id for s in b] and len(a) == 20
    assert {d: sum(s.domain == d for s in a) for d in scenarios.DOMAINS} == {d: 5 for d in scenarios.DOMAINS}
