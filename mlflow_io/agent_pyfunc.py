"""The registered agent as an MLflow pyfunc ("models from code").

Input: a DataFrame with a ``messages`` column; each cell is a list of chat messages
(``{"role": ..., "content": ...}``; role system, user, assistant or tool, a tool message holding a
tool's result). Output: one assistant reply per row; a tool call is written as the policy writes
it (grpo/tools.py: ``<tool_call>{...}</tool_call>``).
Served with ``mlflow models serve -m models:/<name>@champion --env-manager local``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class AgentModel(PythonModel):
    def load_context(self, context):
        from grpo.config import RolloutConfig
        from grpo.models import load_policy
        from grpo.rollout import ConversationEnvironment

        config = context.model_config or {}
        self.model, self.tokenizer = load_policy(context.artifacts["policy"], config.get("device", "auto"))
        rollout = RolloutConfig(
            max_turns=1,
            max_new_tokens=int(config.get("max_new_tokens", 128)),
            temperature=float(config.get("temperature", 0.7)),
            top_p=float(config.get("top_p", 0.9)),
        )
        self.env = ConversationEnvironment(self.tokenizer, rollout)

    def predict(self, context, model_input, params=None):
        from grpo.rollout import conversations_from, decode_reply, encode, render

        conversations = conversations_from(model_input, roles=("system", "user", "assistant", "tool"))
        prompts = [encode(self.tokenizer, render(self.tokenizer, messages, True)) for messages in conversations]
        return [decode_reply(self.tokenizer, out) for out in self.env.generate(self.model, prompts)]


mlflow.models.set_model(AgentModel())
