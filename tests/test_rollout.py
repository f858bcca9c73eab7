import json

import pytest
import torch

from grpo.config import RolloutConfig
from grpo.objective import token_logprobs
from grpo.rollout import ConversationEnvironment, Trajectory, encode, render, user_prompt, user_turn_text
from grpo.scenarios import Scenario
from grpo.tools import parse_call, schemas, template_declares_tools, training_form

SCEN = [
    Scenario(
        id="a",
        domain="sales",
        persona="p",
        goal="g",
        opening="Which plan should I pick?",
        followups=["Thanks.", "And yearly?"],
    ),
    Scenario(id="b", domain="tutoring", persona="p", goal="g", opening="What is 1/3 + 1/4?", followups=[]),
]


def test_user_turn_text_follows_the_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    full = render(tokenizer, msgs + [{"role": "user", "content": "next"}], True)
    prefix = render(tokenizer, msgs[:2], True) + "a" + tokenizer.eos_token
    assert prefix + user_turn_text(tokenizer, "next") == full


def test_rollout_masks_exactly_the_sampled_tokens(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=3, max_new_tokens=6))
    torch.manual_seed(0)
    trajs = env.rollout(tiny_model, SCEN, group_size=2)
    assert [t.scenario_id for t in trajs] == ["a", "a", "b", "b"] and [t.group for t in trajs] == [0, 0, 1, 1]
    assert [t.turns for t in trajs] == [3, 3, 1, 1]  # b has no follow-ups: one agent turn
    eos = tokenizer.eos_token_id
    for t, scen in zip(trajs, [SCEN[0]] * 2 + [SCEN[1]] * 2):
        assert len(t.input_ids) == len(t.assistant_mask) and t.assistant_mask[0] == 0
        prompt = encode(tokenizer, render(tokenizer, scen.first_messages(), True))
        assert t.input_ids[: len(prompt)] == prompt and not any(t.assistant_mask[: len(prompt)])
        # masked runs: each one is one agent turn, decoding to that turn's message
        runs = t.agent_runs()
        replies = [m["content"] for m in t.messages if m["role"] == "assistant"]
        assert len(runs) == len(replies) == t.turns
        for run, reply in zip(runs, replies):
            text = tokenizer.decode([x for x in run if x != eos], skip_special_tokens=True).strip()
            assert text == reply
        # user follow-ups are context (mask 0) and appear verbatim
        for f in scen.followups[: t.turns - 1]:
            ids = encode(tokenizer, f)
            pos = [i for i in range(len(t.input_ids)) if t.input_ids[i : i + len(ids)] == ids]
            assert pos and not any(t.assistant_mask[pos[0] : pos[0] + len(ids)])


def test_all_zero_mask_is_an_error():
    with pytest.raises(ValueError, match="all zeros"):
        Trajectory("x", 0, [], [1, 2], [0, 0]).check()


ORDER = Scenario(
    id="o",
    domain="customer_service",
    persona="p",
    goal="g",
    opening="Where is order 48213?",
    followups=["Thanks. Can I get a refund?"],
    tools=["check_order_status", "process_refund"],
    backend={"orders": {"48213": {"status": "lost in transit", "items": ["lamp"], "total": 20.0, "refundable": True}}},
)


# A Hermes-style template with tool support: the tools' schemas go into the system turn.
TOOL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if loop.first and tools %}{{ '\\n<tools>' + (tools | tojson) + '</tools>' }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def scripted(env, replies):
    """Make ``env.generate`` answer with these texts, in order, one list per batched call."""
    calls = iter(replies)

    def generate(model, prompts, do_sample=True, max_new_tokens=None, seeds=None, **cache):
        texts = next(calls)
        assert len(texts) == len(prompts)
        return [encode(env.tok, t) + [env.tok.eos_token_id] for t in texts]

    env.generate = generate


def masked_runs(t, tokenizer):
    return [tokenizer.decode(run, skip_special_tokens=True).strip() for run in t.agent_runs()]


def test_tool_calls_run_against_the_episode_backend_and_are_context(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=4, max_new_tokens=64))
    call = '<tool_call>{"name": "check_order_status", "arguments": {"order_id": "48213"}}</tool_call>'
    refund = '<tool_call>{"name": "process_refund", "arguments": {"order_id": "48213"}}</tool_call>'
    bad = '<tool_call>{"name": "process_refund", "arguments": </tool_call>'
    scripted(env, [[call, bad], ["It was lost, sorry.", "Sorry, let me look."], [refund, "Done."], ["Refund issued."]])
    a, b = env.rollout(tiny_model, [ORDER], group_size=2)
    assert [m["role"] for m in a.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert json.loads(a.messages[3]["content"])["status"] == "lost in transit"
    assert json.loads(a.messages[7]["content"])["refunded"] == 20.0
    assert ORDER.backend["orders"]["48213"].get("refunded") is None  # the scenario's own data is untouched
    assert (a.tool_calls, a.tool_errors) == (2, 0) and (b.tool_calls, b.tool_errors, b.tool_malformed) == (1, 1, 1)
    assert "not valid JSON" in b.messages[3]["content"] and b.turns == 3  # the episode went on
    assert env.stats["tool_calls"] == 3 and env.stats["tool_errors"] == 1
    assert masked_runs(a, tokenizer) == [m["content"] for m in a.messages if m["role"] == "assistant"]
    assert "check_order_status" in a.messages[0]["content"] and "<tool_call>" in a.messages[0]["content"]


def test_a_chat_template_with_tool_support_declares_the_tools(tokenizer, tiny_model):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    env = ConversationEnvironment(tok, RolloutConfig(max_turns=2, max_new_tokens=64))
    assert env.template_tools and not ConversationEnvironment(tokenizer).template_tools  # SmolLM2's has none
    scripted(env, [['{"name": "check_order_status", "arguments": {"order_id": "48213"}}'], ["It was lost, sorry."]])
    [t] = env.rollout(tiny_model, [ORDER], group_size=1)
    prompt = tok.decode(t.input_ids[: t.assistant_mask.index(1)])
    assert '<tools>[{"type": "function", "function": {"name": "check_order_status"' in prompt
    assert "You can use these tools" not in prompt and "<tools>" not in t.messages[0]["content"]
    assert (t.tool_calls, t.tool_errors) == (1, 0) and json.loads(t.messages[3]["content"])[
        "status"
    ] == "lost in transit"


def test_token_ids_are_the_chat_template_rendering_with_tool_messages(tokenizer, tiny_model):
    """With SmolLM2's real template: the trajectory's ids equal the template's rendering of its
    messages (so context is exactly what the model would see), and only agent tokens are masked."""
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=3, max_new_tokens=64))
    scripted(
        env,
        [
            ['<tool_call>{"name": "check_order_status", "arguments": {"order_id": "1"}}</tool_call>'],
            ["No such order, sorry."],
            ["Anything else?"],
        ],
    )
    [t] = env.rollout(tiny_model, [ORDER], group_size=1)
    assert [m["role"] for m in t.messages][2:] == ["assistant", "tool", "assistant", "user", "assistant"]
    assert t.input_ids + encode(tokenizer, "\n") == encode(tokenizer, render(tokenizer, t.messages, False))
    eos = tokenizer.eos_token_id
    masked = [i for i, m in zip(t.input_ids, t.assistant_mask) if m]
    assert tokenizer.decode([i for i in masked if i != eos]) == "".join(
        m["content"] for m in t.messages if m["role"] == "assistant"
    )
    assert masked.count(eos) == 3  # each agent turn's own end-of-turn token is sampled, so it is trained


def test_llm_user_plays_the_persona_and_can_end_the_episode(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=3, max_new_tokens=16, user="llm"))
    # batched calls: agent turn 1 (both), the user (both), agent turn 2 (a), the user (a), agent turn 3 (a)
    scripted(
        env,
        [
            ["Let me check.", "Hello."],
            ["It is late, I need it by Friday.", "DONE, thanks"],
            ["I will rush it."],
            ["Great."],
            ["Good."],
        ],
    )
    a, b = env.rollout(tiny_model, [ORDER], group_size=2)
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant"] and b.turns == 1
    assert a.messages[3] == {"role": "user", "content": "It is late, I need it by Friday."} and a.turns == 3
    view = user_prompt(ORDER, a.messages)
    assert "Your goal: g" in view[0]["content"] and "You are: p" in view[0]["content"]
    assert [m["role"] for m in view[1:]] == ["assistant", "user", "assistant", "user", "assistant", "user"]
    with pytest.raises(ValueError, match="'scripted' or 'llm'"):
        ConversationEnvironment(tokenizer, RolloutConfig(user="human"))


def test_row_sampler_draws_from_the_tempered_top_p_distribution():
    """Gumbel-max under greedy decoding is a sample of softmax(logits / T), after top-p; rows with
    their own settings in one batch each follow theirs, and temperature 0 is the argmax."""
    from grpo.rollout import RowSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    settings = ((0.7, 1.0), (1.0, 0.8), (1.5, 0.9))

    def expected(temperature, top_p):
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1.0:  # the smallest set whose mass reaches top_p, renormalised
            order = probs.argsort(descending=True)
            keep = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1]
            probs = torch.zeros_like(probs).index_fill(0, keep, 1) * probs
            probs /= probs.sum()
        return probs

    for temperature, top_p in settings:  # one setting for the whole batch, as in training
        picks = RowSampler(list(range(6000)), temperature, top_p)(None, logits.expand(6000, -1)).argmax(-1)
        freq = torch.bincount(picks, minlength=5).float() / 6000
        assert torch.allclose(freq, expected(temperature, top_p), atol=0.02), (temperature, top_p, freq)
    # each row its own setting, interleaved, and greedy rows among them (the server's batches)
    rows = [settings[i % 3] for i in range(18000)] + [(0.0, 0.5)] * 30
    sampler = RowSampler(list(range(len(rows))), [t for t, _ in rows], [p for _, p in rows])
    picks = sampler(None, logits.expand(len(rows), -1)).argmax(-1)
    for k, (temperature, top_p) in enumerate(settings):
        freq = torch.bincount(picks[k:18000:3], minlength=5).float() / 6000
        assert torch.allclose(freq, expected(temperature, top_p), atol=0.02), (temperature, top_p, freq)
    assert picks[18000:].eq(0).all()


def test_a_seeded_episode_does_not_depend_on_the_rows_beside_it(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=6, temperature=0.7))
    alone = env.rollout(tiny_model, [SCEN[0]], 2, seeds=[11, 12])
    beside = env.rollout(tiny_model, [SCEN[1], SCEN[0]], 2, seeds=[21, 22, 11, 12])
    assert [t.input_ids for t in alone] == [t.input_ids for t in beside[2:]]
    assert alone[0].input_ids != alone[1].input_ids  # two seeds, two different episodes


@pytest.mark.parametrize("template", [None, TOOL_TEMPLATE], ids=["smollm2", "with-tool-support"])
def test_the_servers_openai_form_renders_as_training_did(tokenizer, tiny_model, template):
    """An episode in OpenAI's form (function schemas, an assistant ``tool_calls``, a ``tool``
    message), as a client of the server would send it, renders to the very token ids the policy
    saw before its second turn in training, with either kind of chat template."""
    import copy

    tok = copy.deepcopy(tokenizer)
    if template:
        tok.chat_template = template
    env = ConversationEnvironment(tok, RolloutConfig(max_turns=2, max_new_tokens=64))
    call = '<tool_call>{"name": "check_order_status", "arguments": {"order_id": "48213"}}</tool_call>'
    scripted(env, [[call], ["It was lost, sorry."]])
    [t] = env.rollout(tiny_model, [ORDER], group_size=1)
    second_turn = len(t.assistant_mask) - t.assistant_mask[::-1].index(0)
    api = [
        {"role": "system", "content": ORDER.system_prompt()},
        {"role": "user", "content": ORDER.opening},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "check_order_status", "arguments": '{"order_id": "48213"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": t.messages[3]["content"]},
    ]
    messages, tools = training_form(api, schemas(ORDER.tools), template_declares_tools(tok))
    assert encode(tok, render(tok, messages, True, tools)) == t.input_ids[:second_turn]


def test_rollout_jobs_seed_themselves_so_order_and_place_do_not_matter(tiny_model_dir):
    """What lets label and evaluate run their jobs on a Dask cluster: a job's episodes depend on the
    job alone (run in reverse order by a job map, they are the same; another seed changes them), and
    merging renumbers the groups."""
    from dataclasses import replace

    from grpo.rollout import RolloutJob, jobs_run_by, map_jobs, merge_jobs, run_job

    def ids(results):
        return [[t.input_ids for t in trajectories] for trajectories, _ in results]

    config = RolloutConfig(max_new_tokens=6)
    jobs = [RolloutJob(f"j{i}", str(tiny_model_dir), [s], 2, config, seed=7 + i) for i, s in enumerate(SCEN)]
    in_order = map_jobs(jobs, "test")
    with jobs_run_by(lambda js: [run_job(j) for j in js[::-1]][::-1]):
        assert ids(map_jobs(jobs, "test")) == ids(in_order)
    assert ids([run_job(replace(jobs[0], seed=8))]) != ids(in_order[:1])
    merged, stats = merge_jobs(in_order)
    assert [t.scenario_id for t in merged] == ["a", "a", "b", "b"] and [t.group for t in merged] == [0, 0, 1, 1]
    assert stats["gen_tokens"] == sum(s["gen_tokens"] for _, s in in_order) > 0


def test_a_prompt_rows_share_is_prefilled_once_and_changes_no_token(tokenizer, tiny_model):
    """`rollout.share_prefix`: a group's rows share their first prompt; it is prefilled once per
    distinct prompt (all but its last token), and generate then feeds one token a row. Greedy and
    per-row seeded samples are the same as without it."""
    shared = ConversationEnvironment(tokenizer, RolloutConfig(max_new_tokens=6))
    unshared = ConversationEnvironment(tokenizer, RolloutConfig(max_new_tokens=6, share_prefix=False))
    prompts = [shared.start(s, 0).input_ids for s in SCEN for _ in range(3)]
    fed = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(lambda module, args, out: fed.append(out.shape[:2]))
    try:
        greedy = shared.generate(tiny_model, prompts, do_sample=False)
    finally:
        hook.remove()
    assert fed[0] == (2, max(map(len, prompts)) - 1) and fed[1] == (6, 1)
    assert greedy == unshared.generate(tiny_model, prompts, do_sample=False)
    seeds = list(range(6))
    assert shared.generate(tiny_model, prompts, seeds=seeds) == unshared.generate(tiny_model, prompts, seeds=seeds)


def test_later_turns_prefill_only_what_the_conversation_added(tokenizer, tiny_model):
    """`rollout.share_prefix` also keeps the agent's KV cache from turn to turn (TurnCache): a later
    turn prefills each row only the tokens added since its last reply, rows whose episode ended
    drop out, and the episodes are those prefilled afresh, greedy and seeded."""
    config = RolloutConfig(max_turns=3, max_new_tokens=6)
    shared = ConversationEnvironment(tokenizer, config)
    unshared = ConversationEnvironment(tokenizer, config.model_copy(update={"share_prefix": False}))
    fed = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(lambda module, args, out: fed.append(out.shape[:2]))
    try:
        greedy = shared.rollout(tiny_model, SCEN, 3, do_sample=False)
    finally:
        hook.remove()
    prefills = [shape for shape in fed if shape[1] > 1]
    # turn 1: the two distinct prompts; turns 2 and 3: scenario a's 3 rows (b has no follow-up)
    assert len(prefills) == 3 and prefills[0][0] == 2 and [n for n, _ in prefills[1:]] == [3, 3]
    added = max(len(encode(tokenizer, user_turn_text(tokenizer, f))) for f in SCEN[0].followups)
    assert all(width <= added + 2 for _, width in prefills[1:])  # the reply's last token, its eos, the message
    assert min(len(t.input_ids) for t in greedy[:3]) > 3 * added
    assert [t.input_ids for t in greedy] == [t.input_ids for t in unshared.rollout(tiny_model, SCEN, 3, False)]
    assert [t.turns for t in greedy] == [3, 3, 3, 1, 1, 1]
    seeds = list(range(6))
    assert [t.input_ids for t in shared.rollout(tiny_model, SCEN, 3, seeds=seeds)] == [
        t.input_ids for t in unshared.rollout(tiny_model, SCEN, 3, seeds=seeds)
    ]


@pytest.mark.parametrize("strict", [True, False])
def test_strict_tool_calls_cannot_be_malformed(tokenizer, tiny_model, strict):
    """The tiny random model, pushed to write '<' (a bias on its logits), opens every reply with it.
    With strict calls each first reply is then a call of one of the scenario's tools, with the order
    number the user gave, that parses and runs; without, the '<'s are no call at all. When the user
    gave no number, a strict reply cannot even begin like a call: both tools need one."""
    lt = tokenizer.convert_tokens_to_ids("<")

    def push(module, inputs, logits):
        logits[..., lt] += 20.0
        return logits

    hook = tiny_model.lm_head.register_forward_hook(push)
    try:
        env = ConversationEnvironment(
            tokenizer, RolloutConfig(max_turns=2, max_new_tokens=96, strict_tool_calls=strict)
        )
        trajectories = env.rollout(tiny_model, [ORDER], group_size=2, seeds=[1, 2])
        unnumbered = ORDER.model_copy(update={"opening": "Where is my order?"})
        asked = env.rollout(tiny_model, [unnumbered], group_size=2, seeds=[1, 2])
    finally:
        hook.remove()
    for t in trajectories:
        first = t.messages[2]["content"]
        assert first.startswith("<")
        if strict:
            name, arguments = parse_call(first)
            assert name in ORDER.tools and arguments == {"order_id": "48213"}, first
            assert t.tool_calls == 1 and t.messages[3]["role"] == "tool"
            assert t.tool_errors == 0 and t.tool_malformed == 0
        else:
            assert parse_call(first) is None and t.tool_calls == 0
    for t in asked:
        assert t.messages[2]["content"].startswith("<") is not strict
        assert t.tool_calls == 0


def test_sampled_logprobs_are_the_samplers_own(tokenizer, tiny_model):
    """rollout(logprobs=True) keeps each sampled token's log-prob at the sampling temperature: the
    same as a fresh forward of the whole conversation, through the user turn, the left padding and
    the KV cache kept from one turn to the next. Tokens the agent did not sample get 0."""
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_turns=2, max_new_tokens=6, temperature=0.7))
    trajs = env.rollout(tiny_model, SCEN, group_size=2, seeds=[1, 2, 3, 4], logprobs=True)
    assert max(t.turns for t in trajs) == 2
    for t in trajs:
        ids = torch.tensor([t.input_ids])
        fresh = token_logprobs(tiny_model, ids, torch.ones_like(ids), 1, temperature=0.7)[0]
        sampled = torch.tensor(t.assistant_mask[1:]).bool()
        kept = torch.tensor(t.sampled_logps[1:])
        assert torch.allclose(kept[sampled], fresh[sampled], atol=1e-4)
        assert (kept[~sampled] == 0).all() and (kept[sampled] < 0).all()
