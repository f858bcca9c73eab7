"""Multi-turn rollouts: the policy talks, the scripted user answers, token ids are kept exactly.

A :class:`Trajectory` holds the token ids the model saw and sampled, in order, and an
``assistant_mask`` that is 1 exactly on the tokens the policy sampled (its replies, including the
end-of-turn token it chose). System, user and template tokens are context and have mask 0.

All active conversations of all groups are generated in one batched ``generate`` call per agent
turn; nothing loops over trajectories one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from grpo.scenarios import Scenario


@dataclass
class Trajectory:
    scenario_id: str
    group: int
    messages: list[dict]
    input_ids: list[int]
    assistant_mask: list[int]
    turns: int = 0
    truncated_turns: int = 0

    def check(self) -> None:
        if len(self.input_ids) != len(self.assistant_mask):
            raise ValueError(f"trajectory {self.scenario_id}: ids and mask differ in length")
        if not any(self.assistant_mask):
            raise ValueError(f"trajectory {self.scenario_id}: assistant mask is all zeros")


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_turn_text(tokenizer, content: str) -> str:
    """The template text that follows an assistant turn's end-of-turn token and opens a user turn
    plus the next assistant prompt. Derived from the chat template, not hard-coded."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    closed = render(tokenizer, probe, False)
    marker = "a" + tokenizer.eos_token
    k = closed.rfind(marker)
    if k < 0:
        raise NotImplementedError(
            "the chat template does not end assistant turns with the eos token; multi-turn rollouts need it"
        )
    following = render(tokenizer, probe + [{"role": "user", "content": content}], True)
    if not following.startswith(closed):
        raise NotImplementedError("the chat template re-renders earlier turns; multi-turn rollouts need a prefix-stable template")
    return closed[k + len(marker):] + following[len(closed):]


class ConversationEnvironment:
    """Runs episodes of up to ``max_turns`` agent turns against each scenario's scripted user."""

    def __init__(self, tokenizer, max_turns: int = 2, max_new_tokens: int = 48,
                 temperature: float = 1.0, top_p: float = 1.0):
        self.tok = tokenizer
        self.max_turns = max_turns
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stats: dict = {}

    def start(self, scenario: Scenario, group: int) -> Trajectory:
        messages = scenario.first_messages()
        ids = encode(self.tok, render(self.tok, messages, True))
        return Trajectory(scenario.id, group, messages, ids, [0] * len(ids))

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], do_sample: bool = True) -> list[list[int]]:
        """One batched generate call; returns each row's new tokens up to and including eos."""
        device = next(model.parameters()).device
        width = max(map(len, prompts))
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=self.max_new_tokens,
            do_sample=do_sample, temperature=self.temperature if do_sample else None,
            top_p=self.top_p if do_sample else None, top_k=0 if do_sample else None,
            pad_token_id=pad, eos_token_id=self.tok.eos_token_id,
        )[:, width:].tolist()
        eos = self.tok.eos_token_id
        return [row[: row.index(eos) + 1] if eos in row else row for row in out]

    def rollout(self, model, scenarios: list[Scenario], group_size: int, do_sample: bool = True) -> list[Trajectory]:
        """``group_size`` episodes per scenario; trajectory ``i`` belongs to group ``i // group_size``."""
        was_training = model.training
        model.eval()
        trajs = [self.start(s, g) for g, s in enumerate(scenarios) for _ in range(group_size)]
        scen = [s for s in scenarios for _ in range(group_size)]
        eos = self.tok.eos_token_id
        t0, generated = time.perf_counter(), 0
        for turn in range(self.max_turns):
            active = [i for i, s in enumerate(scen) if turn <= len(s.followups)]
            if not active:
                break
            new = self.generate(model, [trajs[i].input_ids for i in active], do_sample)
            for i, toks in zip(active, new):
                t = trajs[i]
                generated += len(toks)
                t.input_ids += toks
                t.assistant_mask += [1] * len(toks)
                t.turns += 1
                if not toks or toks[-1] != eos:  # cut at max_new_tokens: close the turn as context
                    t.truncated_turns += 1
                    t.input_ids.append(eos)
                    t.assistant_mask.append(0)
                text = self.tok.decode([x for x in toks if x != eos], skip_special_tokens=True).strip()
                t.messages.append({"role": "assistant", "content": text})
                if turn + 1 < self.max_turns and turn < len(scen[i].followups):
                    user = scen[i].followups[turn]
                    delta = encode(self.tok, user_turn_text(self.tok, user))
                    t.input_ids += delta
                    t.assistant_mask += [0] * len(delta)
                    t.messages.append({"role": "user", "content": user})
        for t in trajs:
            t.check()
        elapsed = time.perf_counter() - t0
        self.stats = {"gen_tokens": generated, "gen_seconds": elapsed, "gen_tokens_per_s": generated / max(elapsed, 1e-9)}
        model.train(was_training)
        return trajs


def rollout_in_chunks(env: ConversationEnvironment, model, scenarios: list[Scenario], group_size: int,
                      chunk: int, desc: str = "rollout", do_sample: bool = True) -> list[Trajectory]:
    """Roll out many scenarios, ``chunk`` scenarios (times ``group_size``) per batched call, with a
    progress bar."""
    from tqdm.auto import tqdm

    out: list[Trajectory] = []
    tokens = seconds = 0.0
    for i in tqdm(range(0, len(scenarios), chunk), desc=desc, unit="batch"):
        part = env.rollout(model, scenarios[i:i + chunk], group_size, do_sample)
        tokens, seconds = tokens + env.stats["gen_tokens"], seconds + env.stats["gen_seconds"]
        for t in part:
            t.group += i
        out += part
    env.stats = {"gen_tokens": tokens, "gen_seconds": seconds, "gen_tokens_per_s": tokens / max(seconds, 1e-9)}
    return out
