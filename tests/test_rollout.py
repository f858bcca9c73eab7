import pytest
import torch

from grpo.rollout import ConversationEnvironment, Trajectory, encode, render, user_turn_text
from grpo.scenarios import Scenario

SCEN = [
    Scenario(id="a", domain="sales", persona="p", goal="g", opening="Which plan should I pick?", followups=["Thanks.", "And yearly?"]),
    Scenario(id="b", domain="tutoring", persona="p", goal="g", opening="What is 1/3 + 1/4?", followups=[]),
]


def test_user_turn_text_follows_the_chat_template(tokenizer):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    full = render(tokenizer, msgs + [{"role": "user", "content": "next"}], True)
    prefix = render(tokenizer, msgs[:2], True) + "a" + tokenizer.eos_token
    assert prefix + user_turn_text(tokenizer, "next") == full


def test_rollout_masks_exactly_the_sampled_tokens(tokenizer, tiny_model):
    env = ConversationEnvironment(tokenizer, max_turns=3, max_new_tokens=6)
    torch.manual_seed(0)
    trajs = env.rollout(tiny_model, SCEN, group_size=2)
    assert [t.scenario_id for t in trajs] == ["a", "a", "b", "b"] and [t.group for t in trajs] == [0, 0, 1, 1]
    assert [t.turns for t in trajs] == [3, 3, 1, 1]  # b has no follow-ups: one agent turn
    eos = tokenizer.eos_token_id
    for t, scen in zip(trajs, [SCEN[0]] * 2 + [SCEN[1]] * 2):
        assert len(t.input_ids) == len(t.assistant_mask) and t.assistant_mask[0] == 0
        prompt = encode(tokenizer, render(tokenizer, scen.first_messages(), True))
        assert t.input_ids[: len(prompt)] == prompt and not any(t.assistant_mask[: len(prompt)])
        # split masked runs: each one is one agent turn, decoding to that turn's message
        runs, cur = [], []
        for tok, m in zip(t.input_ids, t.assistant_mask):
            if m:
                cur.append(tok)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        replies = [m["content"] for m in t.messages if m["role"] == "assistant"]
        assert len(runs) == len(replies) == t.turns
        for run, reply in zip(runs, replies):
            text = tokenizer.decode([x for x in run if x != eos], skip_special_tokens=True).strip()
            assert text == reply
        # user follow-ups are context (mask 0) and appear verbatim
        for f in scen.followups[: t.turns - 1]:
            ids = encode(tokenizer, f)
            pos = [i for i in range(len(t.input_ids)) if t.input_ids[i:i + len(ids)] == ids]
            assert pos and not any(t.assistant_mask[pos[0]:pos[0] + len(ids)])


def test_all_zero_mask_is_an_error():
    with pytest.raises(ValueError, match="all zeros"):
        Trajectory("x", 0, [], [1, 2], [0, 0]).check()
