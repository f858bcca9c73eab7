from pathlib import Path

import pytest

from grpo import scenarios as S
from grpo.validation import ValidationFailed, validate

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = {"min_chars": 5, "max_chars": 2000, "min_followups": 1}


def test_shipped_set_covers_every_domain():
    scen = S.load_dir(ROOT / "data/scenarios")
    assert len(scen) >= 40
    counts = {d: sum(s.domain == d for s in scen) for d in S.DOMAINS}
    assert all(n >= 10 for n in counts.values()), counts
    assert len({s.id for s in scen}) == len(scen)


def test_shipped_set_passes_validation():
    report = validate(S.to_frame(S.load_dir(ROOT / "data/scenarios")), BOUNDS)
    assert report["success"] and report["failed"] == 0 and report["evaluated"] >= 10


def test_validation_names_ids_files_and_expectations():
    df = S.to_frame(S.load_dir(ROOT / "data/scenarios"))
    df.loc[1, "id"] = df.loc[0, "id"]
    df.loc[2, "domain"] = "cooking"
    df.at[3, "followups"] = ["  "]
    with pytest.raises(ValidationFailed) as e:
        validate(df, BOUNDS)
    failed = {f["expectation"]: f for f in e.value.report["failures"]}
    assert df.loc[0, "id"] in failed["expect_column_values_to_be_unique"]["ids"]
    assert failed["expect_column_values_to_be_in_set"]["ids"] == [df.loc[2, "id"]]
    assert df.loc[3, "id"] in str(e.value) and "customer_service.yaml" in str(e.value)


def test_split_is_deterministic_stratified_and_disjoint():
    df = S.to_frame(S.load_dir(ROOT / "data/scenarios"))
    train, ev = S.split(df, 0.25, seed=7)
    train2, ev2 = S.split(df.sample(frac=1, random_state=1), 0.25, seed=7)
    assert sorted(ev["id"]) == sorted(ev2["id"])
    assert not set(train["id"]) & set(ev["id"]) and len(train) + len(ev) == len(df)
    assert set(ev["domain"]) == set(S.DOMAINS)
    assert sorted(S.split(df, 0.25, seed=8)[1]["id"]) != sorted(ev["id"])


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("- id: a\n  domain: [unclosed", "invalid YAML"),
    ("id: a\n", "expected a list"),
    ("- id: a\n  domain: sales\n", "missing field(s) persona"),
    ("- {id: a, domain: sales, persona: p, opening: o, followups: nope, expected_behaviours: [], keywords: [], difficulty: easy}",
     "field 'followups' must be a list"),
    ("- {id: a, colour: red, domain: sales, persona: p, opening: o, followups: [], expected_behaviours: [], keywords: [], difficulty: easy}",
     "unknown field(s) colour"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(S.ScenarioError) as e:
        S.load_dir(tmp_path)
    assert str(f) in str(e.value) and message in str(e.value)


def test_invalid_utf8_and_empty_directory(tmp_path):
    with pytest.raises(S.ScenarioError, match="no \\*.yaml"):
        S.load_dir(tmp_path)
    (tmp_path / "x.yaml").write_bytes(b"- id: \xff\xfe\n")
    with pytest.raises(S.ScenarioError, match="not valid UTF-8"):
        S.load_dir(tmp_path)


def test_frame_roundtrip_keeps_lists():
    scen = S.load_dir(ROOT / "data/scenarios")[:3]
    back = S.from_frame(S.to_frame(scen))
    assert back == scen
