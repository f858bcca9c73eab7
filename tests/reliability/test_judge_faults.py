"""The label stage against a fault-injecting OpenAI-compatible judge: a real HTTP server on loopback
that misbehaves per scenario group, as scripted, whatever order the judge's threads ask in."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

import tasks.label
from grpo import scenarios
from grpo.config import RolloutConfig
from grpo.labels import on_heuristic_scale
from grpo.rewards import RewardConfig
from grpo_agents.params import BaseModelParams, JudgeParams, LabelParams, load_params

SEED, TIMEOUT_S = 7, 1.0
RETRY_AFTER_S = 0.8  # above the SDK's own first backoff (at most 0.5 s), so waiting this long shows it obeyed
# fault -> (the group's label_source, requests the judge sends: HTTP retries and repair included)
FAULTS = {
    "good": ("judge", 1),
    "always_500": ("fallback", 2),  # max_retries=1: both attempts fail
    "500_once": ("judge", 2),
    "429_once": ("judge", 2),  # with Retry-After
    "truncated_then_repaired": ("judge", 2),  # the answer's JSON is cut off; the repair answers well
    "truncated_twice": ("fallback", 2),  # ... and the repair is cut off too
    "wrong_count": ("fallback", 2),  # one score too few, then one too many
    "timeout": ("fallback", 2),  # every answer comes after the client's timeout
    "slow_drip": ("judge", 1),  # the body in 64-byte pieces 0.1 s apart, within the timeout
    "truncated_body": ("fallback", 1),  # a 200 whose HTTP body is cut-off JSON (the SDK does not retry)
    "not_a_completion": ("fallback", 1),  # a 200 whose JSON has no choices
}
REPAIRED = {"truncated_then_repaired", "truncated_twice", "wrong_count"}
NOT_CACHED = {"always_500", "timeout", "truncated_body", "not_a_completion"}  # a rerun asks these again
N_JUDGE_FALLBACK = sum(source == "fallback" for source, _ in FAULTS.values())
N_HEURISTIC = 2  # groups not sent to the judge
COUNTS = [
    "label_source_judge",
    "label_source_fallback",
    "label_source_heuristic",
    "judge_fallback_rate",
    "judge_repair_rate",
]


def completion(content: str) -> bytes:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    return json.dumps({"object": "chat.completion", "created": 0, "model": "stub", "choices": [choice]}).encode()


def scores(n: int, reverse: bool = False) -> str:
    values = sorted(((k + 1) / (n + 1) for k in range(n)), reverse=reverse)
    return json.dumps({"scores": [{"id": str(k + 1), "score": s} for k, s in enumerate(values)]})


class Stub(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` on loopback. The ticket named in the prompt picks the group's
    fault from ``script``; each request is logged as (ticket, is it a repair, when)."""

    request_queue_size = 64  # the judge opens max_concurrency connections at once

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: dict[str, str] = {}
        self.log: list[tuple[str, bool, float]] = []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_port}/v1"

    def requests(self, ticket: str, repair: bool | None = None) -> list[float]:
        return [t for k, r, t in self.log if k == ticket and repair in (None, r)]


class Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes, headers: dict | None = None, drip: float = 0.0):
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": len(body), **(headers or {})}.items():
            self.send_header(k, str(v))
        self.end_headers()
        step = 64 if drip else len(body)
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            self.wfile.flush()
            time.sleep(drip)

    def do_POST(self):
        messages = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
        ticket = re.search(r"Ticket (s\d+):", messages[1]["content"])[1]
        n = int(re.search(r"Score each of the (\d+) conversations", messages[0]["content"])[1])
        repair = len(messages) > 2
        with self.server.lock:
            kind = self.server.script[ticket]
            first = not self.server.requests(ticket, repair)
            self.server.log.append((ticket, repair, time.monotonic()))
        good = completion(scores(n))
        try:
            if kind == "always_500" or (kind == "500_once" and first):
                self.send(500, b'{"error": {"message": "boom"}}')
            elif kind == "429_once" and first:
                self.send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": RETRY_AFTER_S})
            elif kind == "truncated_twice" or (kind == "truncated_then_repaired" and not repair):
                self.send(200, completion(scores(n)[: scores(n).index("}") + 1]))  # cut after the first entry
            elif kind == "wrong_count":
                self.send(200, completion(scores(n + 1 if repair else n - 1)))
            elif kind == "timeout":
                time.sleep(TIMEOUT_S * 1.5)
                self.send(200, good)
            elif kind == "slow_drip":
                self.send(200, good, drip=0.1)
            elif kind == "truncated_body":
                self.send(200, good[: len(good) // 2])
            elif kind == "not_a_completion":
                self.send(200, b'{"object": "error", "message": "the model is loading"}')
            else:  # good, a retry that now succeeds, and "fresh" (the rerun's answer: reversed scores)
                self.send(200, completion(scores(n, reverse=kind == "fresh")))
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture
def stub():
    with Stub() as s:
        threading.Thread(target=s.serve_forever, daemon=True).start()
        yield s
        s.shutdown()


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """Runs the real label stage (tasks/label.py) in tmp_path on 13 prepared train scenarios, whose
    openings name their ticket, with the tiny random model as the base policy. MLflow logging is
    recorded instead. Returns ``label(**judge_settings) -> (summary, labels, judgements)``."""
    monkeypatch.chdir(tmp_path)
    train = [
        scenarios.Scenario(
            id=f"s{i:02d}",
            domain=scenarios.DOMAINS[i % 4],
            persona="p",
            goal="g",
            opening=f"Ticket s{i:02d}: my order is late.",
        )
        for i in range(len(FAULTS) + N_HEURISTIC)
    ]
    Path("data/prepared").mkdir(parents=True)
    scenarios.to_frame(train).to_parquet("data/prepared/train.parquet")
    Path("data/models/base").parent.mkdir()
    Path("data/models/base").symlink_to(tiny_model_dir)
    logged: dict = {}
    monkeypatch.setattr(tasks.label, "log_metrics", lambda m: logged.update(metrics=m))
    monkeypatch.setattr(tasks.label, "log_dict", lambda d, name: logged.update({name: d}))
    paths = load_params(ROOT / "params.yaml").paths

    def label(**judge) -> tuple[dict, pd.DataFrame, dict]:
        summary = tasks.label.run(
            label=LabelParams(max_scenarios=None, group_size=2, chunk_scenarios=len(train)),
            rollout=RolloutConfig(max_turns=1, max_new_tokens=4),
            reward=RewardConfig(weights={"length": 1.0, "empathy": 1.0}),
            judge=JudgeParams(
                **{"model": "stub", "max_groups": len(FAULTS), "max_concurrency": len(FAULTS), **judge},
                timeout_s=TIMEOUT_S,
                max_retries=1,
            ),
            seed=SEED,
            encoder="",
            base_model=BaseModelParams(source="tiny"),
            device="cpu",
            paths=paths,
        )
        written = json.loads(Path(paths.metrics, "label.json").read_text())
        assert logged["metrics"] is summary and {k: written[k] for k in COUNTS} == {k: summary[k] for k in COUNTS}
        return summary, pd.read_parquet(paths.labels), logged["judgements.json"]

    label.judged = [s.id for s in scenarios.subsample(train, len(FAULTS), SEED)]  # as the stage picks them
    label.paths = paths
    return label


def per_group(labels: pd.DataFrame, column: str) -> dict:
    """``column``'s one value for each group (every row of a group must agree)."""
    grouped = labels.groupby("scenario_id")[column]
    assert (grouped.nunique(dropna=False) == 1).all()
    return grouped.first().to_dict()


def test_every_fault_is_survived_labelled_truly_and_a_rerun_asks_only_for_what_is_missing(stub, project):
    """Label completes; each group's label_source is what its fault dictates and the counts say so;
    a rerun reuses every cached verdict unchanged and asks again only for the transport failures."""
    stub.script = dict(zip(project.judged, FAULTS))
    ticket = {kind: t for t, kind in stub.script.items()}
    summary, labels, judgements = project(base_url=stub.url, max_fallback_rate=0.6)

    heuristic = dict.fromkeys(set(labels["scenario_id"]) - set(project.judged), "heuristic")
    assert per_group(labels, "label_source") == {**heuristic, **{ticket[k]: FAULTS[k][0] for k in FAULTS}}
    for kind, (_, n_requests) in FAULTS.items():
        assert len(stub.requests(ticket[kind])) == n_requests, kind
        assert len(stub.requests(ticket[kind], repair=True)) == (kind in REPAIRED), kind
    n_judge = len(FAULTS) - N_JUDGE_FALLBACK
    assert [summary[k] for k in COUNTS] == [
        2 * n_judge,  # group_size 2
        2 * N_JUDGE_FALLBACK,
        2 * N_HEURISTIC,
        N_JUDGE_FALLBACK / len(FAULTS),
        len(REPAIRED) / len(FAULTS),
    ]
    assert summary["judge_groups"] == len(FAULTS)
    judged_rows = labels[labels["label_source"] == "judge"]
    assert list(judged_rows["judge_score"]) == [1 / 3, 2 / 3] * n_judge
    for _, group in judged_rows.groupby("scenario_id"):  # the label: the judge's order on the heuristic's scale
        expected = on_heuristic_scale(group["judge_score"], group["heuristic_score"])
        assert list(group["score"]) == pytest.approx(list(expected))

    notes = per_group(labels[labels["label_source"] == "fallback"], "judge_note")
    assert notes[ticket["always_500"]].startswith("InternalServerError")
    assert notes[ticket["timeout"]].startswith("APITimeoutError")
    assert notes[ticket["truncated_body"]].startswith("JudgeResponseError: the response body is not JSON")
    assert notes[ticket["not_a_completion"]].startswith("JudgeResponseError: the response is not a chat completion")
    assert "; after repair: invalid JSON" in notes[ticket["truncated_twice"]]
    assert notes[ticket["wrong_count"]] == "expected 2 scores, got 1; after repair: expected 2 scores, got 3"
    first, retry = stub.requests(ticket["429_once"])
    assert retry - first >= RETRY_AFTER_S  # the client waited as long as Retry-After said

    # The rerun: everything answers well now, with reversed scores, and the same cache.
    stub.log, stub.script = [], dict.fromkeys(project.judged, "fresh")
    summary2, labels2, judgements2 = project(base_url=stub.url, max_fallback_rate=0.6)
    assert list(labels2["conversation"]) == list(labels["conversation"])  # the same samples, so the same keys
    assert sorted(t for t, _, _ in stub.log) == sorted(ticket[k] for k in NOT_CACHED)  # one request each
    cached = [ticket[k] for k in FAULTS if k not in NOT_CACHED]
    assert {t: judgements2[t] for t in cached} == {t: judgements[t] for t in cached}
    columns = ["scenario_id", "label_source", "judge_score", "judge_note"]
    reused = labels2["scenario_id"].isin(cached)
    pd.testing.assert_frame_equal(labels2.loc[reused, columns], labels.loc[reused, columns])
    asked = labels2[labels2["scenario_id"].isin([ticket[k] for k in NOT_CACHED])]
    assert set(asked["label_source"]) == {"judge"} and list(asked["judge_score"]) == [2 / 3, 1 / 3] * len(NOT_CACHED)
    assert summary2["judge_fallback_rate"] == 2 / len(FAULTS)  # truncated_twice and wrong_count: cached fallbacks


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_connection_refused_falls_back_for_every_group_and_label_completes(project):
    """No judge listening: every judged group falls back, nothing is cached, the labels are written."""
    summary, labels, _ = project(base_url=closed_port_url(), max_fallback_rate=1.0)
    assert [summary[k] for k in COUNTS] == [0, 2 * len(FAULTS), 2 * N_HEURISTIC, 1.0, 0.0]
    notes = per_group(labels[labels["label_source"] == "fallback"], "judge_note")
    assert sorted(notes) == sorted(project.judged)
    assert all(n.startswith("APIConnectionError") for n in notes.values())
    assert not list(Path(project.paths.judge_cache).glob("*.json"))


def test_connection_refused_above_max_fallback_rate_fails_the_stage_clearly(project):
    """The same with judge.max_fallback_rate 0.5: the stage fails, says why, and writes no labels."""
    with pytest.raises(ValueError, match=rf"judge fallback rate 1.00 \({len(FAULTS)} of {len(FAULTS)} groups\)"):
        project(base_url=closed_port_url(), max_fallback_rate=0.5)
    assert not Path(project.paths.labels).exists()
