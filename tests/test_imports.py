import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from grpo import scenarios
from grpo.imports import import_source, mask_pii
from grpo.validation import validate

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "data/expectations/scenarios.json"
BITEXT = ROOT.parent / "shared/data/bitext/bitext_customer_support_sample.csv"
CHATS = [
    {
        "id": "c1",
        "messages": [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": "My order 113542617735902 never came. Mail me at jo@example.com"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "check_order_status"}}]},
            {"role": "tool", "content": '{"status": "lost"}'},
            {"role": "assistant", "content": "Sorry, it was lost. I'll send a new one."},
            {"role": "user", "content": "Thanks. Call me on +44 20 7946 0958 if needed."},
        ],
    },
    {
        "domain": "technical_support",
        "messages": [
            {"role": "user", "content": "The app crashes on start."},
            {"role": "assistant", "content": "Which version are you on?"},
        ],
    },
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_chat_import_maps_turns_masks_pii_and_validates(tmp_path):
    f = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    scen, counts = import_source({"path": str(f), "format": "jsonl", "domain": "customer_service"}, mask=True)
    a, b = scen
    assert a.id == "c1" and a.domain == "customer_service" and b.domain == "technical_support"
    assert a.opening == "My order 113542617735902 never came. Mail me at [EMAIL]"
    assert a.followups == ["Thanks. Call me on [PHONE] if needed."]
    assert a.example_responses == [
        "Sorry, it was lost. I'll send a new one."
    ]  # tool-call turn and tool result are context
    assert b.id == "chats-00002" and "import:chats.jsonl" in b.tags
    assert counts == Counter(email=1, phone=1)
    assert validate(scenarios.to_frame(scen), SUITE)["success"]
    unmasked, counts = import_source({"path": str(f), "format": "jsonl", "domain": "customer_service"}, mask=False)
    assert "jo@example.com" in unmasked[0].opening and not counts


def test_parquet_and_hf_dataset_dir_give_the_same_scenarios(tmp_path):
    import datasets

    jsonl, _ = import_source(
        {"path": str(write_jsonl(tmp_path / "chats.jsonl", CHATS)), "format": "jsonl", "domain": "sales"}, mask=True
    )
    rows = [{"id": f"r{i}", "messages": c["messages"][:2] if i else c["messages"][1:2]} for i, c in enumerate(CHATS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "chats.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    pq, _ = import_source({"path": str(tmp_path / "chats.parquet"), "format": "parquet", "domain": "sales"}, mask=True)
    hf, _ = import_source({"path": str(tmp_path / "hf"), "format": "hf", "domain": "sales"}, mask=True)
    strip = lambda xs: [s.model_dump(exclude={"source", "tags"}) for s in xs]
    assert strip(pq) == strip(hf)
    assert pq[0].opening == jsonl[0].opening and pq[1].opening == "The app crashes on start."


@pytest.mark.skipif(not BITEXT.exists(), reason=f"the Bitext sample is not at {BITEXT} (CI has it beside the clone)")
def test_bitext_csv_becomes_valid_scenarios_through_a_column_mapping():
    source = {
        "path": str(BITEXT),
        "format": "csv",
        "domain": "customer_service",
        "columns": {"opening": "instruction", "example_response": "response", "tags": ["intent", "category", "tags"]},
    }
    scen, counts = import_source(source, mask=True)
    raw = pd.read_csv(BITEXT, dtype=str, keep_default_na=False)
    assert len(scen) == len(raw) == 336
    assert scen[0].opening == raw["instruction"][0] and scen[0].example_responses == [raw["response"][0]]
    assert f"intent:{raw['intent'][0]}" in scen[0].tags
    assert {s.domain for s in scen} == {"customer_service"}
    assert counts["phone"] > 0 and counts["card"] == 0  # its order numbers are not card numbers
    report = validate(scenarios.to_frame(scen), SUITE)
    assert report["success"] and report["rows"] == 336


@pytest.mark.parametrize(
    "rows, source, message",
    [
        ([{"messages": [{"role": "robot", "content": "hi"}]}], {}, "row 1: message 0 has unknown role 'robot'"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}], {}, "row 1: no user message"),
        ([{"messages": []}], {}, "row 1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "user", "content": "hi there"}]}], {"domain": None}, "row 1: no domain"),
        ([{"question": "hi"}], {"columns": {"opening": "text"}}, "missing: text (columns present: question)"),
    ],
)
def test_bad_import_rows_name_file_row_and_problem(tmp_path, rows, source, message):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(scenarios.ScenarioError) as e:
        import_source({"path": str(f), "format": "jsonl", "domain": "sales", **source}, mask=True)
    assert str(f) in str(e.value) and message in str(e.value)


def test_bad_import_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(scenarios.ScenarioError, match="broken.jsonl: line 1: invalid JSON"):
        import_source({"path": str(tmp_path / "broken.jsonl"), "format": "jsonl", "domain": "sales"}, mask=True)
    with pytest.raises(scenarios.ScenarioError, match="format 'xml' is not one of"):
        import_source({"path": str(tmp_path / "broken.jsonl"), "format": "xml"}, mask=True)
    with pytest.raises(scenarios.ScenarioError, match="import source not found"):
        import_source({"path": str(tmp_path / "nope.csv"), "format": "csv"}, mask=True)


def test_pii_masking_keeps_order_numbers():
    counts = Counter()
    out = mask_pii("card 4111 1111 1111 1111, amex 3782-822463-10005, order 113542617735902, a@b.io", counts)
    assert out == "card [CARD], amex [CARD], order 113542617735902, [EMAIL]"
    assert counts == Counter(card=2, email=1)
