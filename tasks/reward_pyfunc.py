"""The learned reward model as an MLflow pyfunc ("models from code"), to serve it on its own.

Input: a DataFrame with a ``messages`` column; each cell is a whole conversation, a list of chat
messages (``{"role": ..., "content": ...}``). Output: one reward-model score per row (the scale of
the labels it was trained on; higher is better).
Served with ``mlflow models serve -m models:/<reward name>@champion --env-manager local``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class RewardModelPyfunc(PythonModel):
    def load_context(self, context):
        from grpo.models import pick_device
        from grpo.reward_model import RewardModel

        device = (context.model_config or {}).get("device", "auto")
        self.rm = RewardModel.load(context.artifacts["reward_model"], str(pick_device(device)))

    def predict(self, context, model_input, params=None):
        rows = model_input["messages"].tolist() if hasattr(model_input, "columns") else list(model_input)
        convs = []
        for i, messages in enumerate(rows):
            messages = [dict(m) for m in messages]
            if not messages or any("role" not in m or "content" not in m for m in messages):
                raise ValueError(f"row {i}: messages must be a non-empty list of {{role, content}}")
            convs.append(messages)
        return [float(x) for x in self.rm.predict(convs)]


mlflow.models.set_model(RewardModelPyfunc())
