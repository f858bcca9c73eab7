"""The learned reward model as an MLflow pyfunc ("models from code"), to serve it on its own.

Input: a DataFrame with a ``messages`` column; each cell is a whole conversation, a list of chat
messages (``{"role": ..., "content": ...}``). Output: one reward-model score per row (the scale of
the labels it was trained on; higher is better).
Served with ``mlflow models serve -m models:/<reward name>@challenger --env-manager local`` (every
registered reward model gets the alias ``challenger``; promotion gates the agent only).
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
        from grpo.rollout import conversations_from

        return [float(x) for x in self.rm.predict(conversations_from(model_input))]


mlflow.models.set_model(RewardModelPyfunc())
