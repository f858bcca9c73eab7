import json

import httpx
import openai
import pytest

from grpo.config import Limits
from grpo.judge import Judge, JudgeConfig, JudgeFormatError, build_prompt, parse_answer
from grpo.models import load_causal_lm, load_tokenizer
from grpo.serving import create_app, serve_in_thread

SYSTEM = {"role": "system", "content": "You are a support agent."}
OPEN = {"role": "user", "content": "My order is late."}
GROUP = [[SYSTEM, OPEN, {"role": "assistant", "content": f"Reply {i}"}] for i in range(3)]


def answer(scores) -> str:
    return json.dumps(
        {"scores": [{"id": str(i + 1), "score": s, "explanation": f"because {i}"} for i, s in enumerate(scores)]}
    )


def test_parse_answer_accepts_good_json_in_any_order_and_surrounding_text():
    text = "Sure! " + json.dumps(
        {"scores": [{"id": "2", "score": 1}, {"id": "1", "score": 0.25, "explanation": "meh"}]}
    )
    assert parse_answer(text, 2) == ([0.25, 1.0], ["meh", ""])


@pytest.mark.parametrize(
    "text, problem",
    [
        ("I think the first one is best.", "no JSON object"),
        ('{"scores": [{"id": "1", "score": 0.5},]}', "invalid JSON"),
        (answer([0.5, 0.5]), "expected 3 scores, got 2"),
        (json.dumps({"scores": [{"id": i, "score": 0.5} for i in ("1", "2", "9")]}), "do not match"),
        (answer([0.5, 7, 0.1]), "score 7 for id '2' is not a number from 0 to 1"),
        (json.dumps({"verdict": "good"}), 'expected a "scores" list'),
    ],
)
def test_parse_answer_says_what_is_wrong(text, problem):
    with pytest.raises(JudgeFormatError, match=problem):
        parse_answer(text, 3)


def test_prompt_shows_the_shared_prefix_once_and_every_continuation():
    user = build_prompt("be helpful", GROUP)[1]["content"]
    assert user.count("My order is late.") == 1 and user.count("You are a support agent.") == 1
    assert all(f"Conversation {i + 1}:\nASSISTANT: Reply {i}" in user for i in range(3))


class Scripted:
    """An OpenAI-compatible endpoint that answers from a script and records what it was sent."""

    def __init__(self, *replies):
        self.replies, self.requests = list(replies), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, int):
            return httpx.Response(reply, json={"error": {"message": "boom"}})
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            },
        )


def judge_with(script: Scripted, **kw) -> Judge:
    config = JudgeConfig(model="m", base_url="http://judge.test/v1", max_concurrency=1, **kw)
    client = openai.OpenAI(
        base_url=config.base_url,
        api_key="secret-key",
        max_retries=kw.get("max_retries", 0),
        http_client=httpx.Client(transport=httpx.MockTransport(script)),
    )
    return Judge(config, client)


def test_good_answer_repair_and_fallback(tmp_path):
    script = Scripted(answer([0.1, 0.9, 0.5]), "not json", answer([0.3, 0.2, 0.1]), "nope", "still nope")
    j = judge_with(script)
    good, repaired, failed = [j.judge_group("sales", GROUP) for _ in range(3)]
    assert (good.source, good.scores, good.repaired) == ("judge", [0.1, 0.9, 0.5], False)
    assert (repaired.source, repaired.scores, repaired.repaired) == ("judge", [0.3, 0.2, 0.1], True)
    assert failed.source == "fallback" and failed.scores is None and "no JSON object" in failed.error
    repair_request = json.loads(script.requests[2].content)
    assert repair_request["messages"][-2] == {"role": "assistant", "content": "not json"}
    assert "no JSON object" in repair_request["messages"][-1]["content"]


def test_http_errors_are_retried_then_fall_back_without_caching(tmp_path):
    j = judge_with(Scripted(500, answer([0.2, 0.4, 0.6])), max_retries=1)
    assert j.judge_group("sales", GROUP).scores == [0.2, 0.4, 0.6]
    j = judge_with(Scripted(503, 503))
    [v] = j.judge_groups([("sales", GROUP)], tmp_path)
    assert v.source == "fallback" and "503" in v.error and not list(tmp_path.iterdir())


def test_cache_answers_reruns_without_asking_and_never_holds_the_key(tmp_path):
    groups = [("sales", GROUP), ("tutoring", GROUP)]
    script = Scripted(answer([0.1, 0.2, 0.3]), "bad", "bad")
    first = judge_with(script).judge_groups(groups, tmp_path)
    assert [v.source for v in first] == ["judge", "fallback"] and len(script.requests) == 3
    assert script.requests[0].headers["authorization"] == "Bearer secret-key"
    rerun = Scripted()
    again = judge_with(rerun).judge_groups(groups, tmp_path)
    assert rerun.requests == [] and [v.__dict__ for v in again] == [v.__dict__ for v in first]
    assert not any("secret-key" in f.read_text() for f in tmp_path.iterdir())
    other_rubric = judge_with(Scripted(answer([0.5, 0.5, 0.5]), answer([0.5, 0.5, 0.5])), rubrics={"default": "terse"})
    assert [v.scores for v in other_rubric.judge_groups(groups, tmp_path)] == [[0.5] * 3] * 2


def test_the_real_openai_path_against_the_project_server(tiny_model_dir, tmp_path):
    """A tiny random model answers nonsense: the judge repairs once, then falls back, and says why."""
    app = create_app(
        lambda: (load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), "tiny"),
        Limits(max_tokens=16, max_prompt_tokens=4096),
    )
    with serve_in_thread(app) as url:
        j = Judge(JudgeConfig(model="tiny", base_url=f"{url}/v1", max_tokens=16, max_concurrency=2))
        verdicts = j.judge_groups([("sales", GROUP), ("tutoring", GROUP)], tmp_path)
    assert all(v.source == "fallback" and v.repaired and "after repair" in v.error for v in verdicts)
    assert len(list(tmp_path.iterdir())) == 2


def test_structured_answers_cannot_be_malformed(tiny_model_dir, tmp_path):
    """The same random model judges through judge.endpoint, which serves it itself and asks for
    structured outputs: the server decodes under the answer's JSON schema, so every group gets
    scores (nonsense ones: the model is random), with no repair and no fallback."""
    from grpo.judge import SCORES, judge_groups

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    config = JudgeConfig(model="tiny", max_tokens=160, max_concurrency=2)
    groups = [("sales", GROUP), ("tutoring", GROUP[:2])]
    verdicts = judge_groups(config, groups, tmp_path, model, tokenizer, "tiny")
    assert [v.source for v in verdicts] == ["judge", "judge"] and not any(v.repaired for v in verdicts)
    assert [len(v.scores) for v in verdicts] == [3, 2] and all(s in SCORES for v in verdicts for s in v.scores)
    free = judge_groups(
        config.model_copy(update={"structured": False}), groups, tmp_path / "free", model, tokenizer, "tiny"
    )
    assert [v.source for v in free] == ["fallback", "fallback"]  # the same model, unconstrained
