"""The registered agent as an MLflow pyfunc ("models from code").

Input: a DataFrame with a ``messages`` column; each cell is a list of chat messages
(``{"role": ..., "content": ...}``). Output: one assistant reply per row.
Served with ``mlflow models serve -m models:/<name>@champion --env-manager local``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class AgentModel(PythonModel):
    def load_context(self, context):
        from grpo.models import load_causal_lm, load_tokenizer, pick_device
        from grpo.rollout import ConversationEnvironment

        config = context.model_config or {}
        path = context.artifacts["policy"]
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, pick_device(config.get("device", "auto")))
        self.env = ConversationEnvironment(self.tokenizer, max_turns=1, max_new_tokens=int(config.get("max_new_tokens", 128)),
                                           temperature=float(config.get("temperature", 0.7)), top_p=float(config.get("top_p", 0.9)))

    def predict(self, context, model_input, params=None):
        from grpo.rollout import encode, render

        rows = model_input["messages"].tolist() if hasattr(model_input, "columns") else list(model_input)
        prompts = []
        for i, messages in enumerate(rows):
            messages = [dict(m) for m in messages]
            if not messages or any(set(m) - {"role", "content"} or m.get("role") not in ("system", "user", "assistant") for m in messages):
                raise ValueError(f"row {i}: messages must be a non-empty list of {{role, content}} with role system|user|assistant")
            prompts.append(encode(self.tokenizer, render(self.tokenizer, messages, True)))
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode([t for t in out if t != eos], skip_special_tokens=True).strip()
                for out in self.env.generate(self.model, prompts)]


mlflow.models.set_model(AgentModel())
