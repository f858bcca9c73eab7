"""A learned reward model: a sentence-transformers encoder plus a small MLP regression head.

The whole conversation (user and agent turns, with roles) is encoded. When it exceeds the token
budget, the oldest turns are dropped first, since the latest exchange matters most for the reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grpo.models import resolve_spec


def load_encoder(spec: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_spec(spec)  # raises if a package or directory is missing: no random fallback
    return SentenceTransformer(path, device=device)


class RewardModel:
    def __init__(self, encoder, head: nn.Module, max_tokens: int = 256):
        self.encoder = encoder
        self.head = head
        self.max_tokens = max_tokens
        # The head is trained on standardised targets, so an untrained head predicts the mean.
        self.target_mean, self.target_std = 0.0, 1.0

    @classmethod
    def create(cls, encoder_spec: str, hidden: int = 128, max_tokens: int = 256, seed: int = 0, device: str = "cpu"):
        encoder = load_encoder(encoder_spec, device)
        torch.manual_seed(seed)
        dim = encoder.get_embedding_dimension()
        head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(head[2].weight)  # start from "predict the mean"
        nn.init.zeros_(head[2].bias)
        return cls(encoder, head, max_tokens)

    def text(self, conversation: list[dict]) -> str:
        """Role-tagged turns, newest kept first, within ``max_tokens`` encoder tokens."""
        turns = [f"{m['role']}: {m['content']}" for m in conversation if m["role"] != "system"]
        kept, used = [], 0
        for t in reversed(turns):
            n = len(self.encoder.tokenizer(t, add_special_tokens=False)["input_ids"])
            if kept and used + n > self.max_tokens:
                break
            kept.append(t)
            used += n
        return "\n".join(reversed(kept))

    def embed(self, conversations: list[list[dict]], batch_size: int = 32) -> torch.Tensor:
        texts = [self.text(c) for c in conversations]
        return self.encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).cpu()

    @torch.no_grad()
    def score_embeddings(self, x: torch.Tensor) -> np.ndarray:
        self.head.eval()
        return (self.head(x).squeeze(1) * self.target_std + self.target_mean).numpy()

    def predict(self, conversations: list[list[dict]]) -> np.ndarray:
        return self.score_embeddings(self.embed(conversations))

    def fit(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
            epochs: int = 300, lr: float = 1e-3, patience: int = 30, weight_decay: float = 1e-4) -> dict:
        """Train the head on frozen encoder embeddings with early stopping on validation MSE."""
        self.target_mean, self.target_std = float(y.mean()), float(max(y.std(), 1e-6))
        y, y_val = (y - self.target_mean) / self.target_std, (y_val - self.target_mean) / self.target_std
        opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        best, best_state, since = float("inf"), None, 0
        for epoch in range(epochs):
            self.head.train()
            opt.zero_grad()
            loss = nn.functional.mse_loss(self.head(x).squeeze(1), y)
            loss.backward()
            nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
            opt.step()
            self.head.eval()
            with torch.no_grad():
                val = nn.functional.mse_loss(self.head(x_val).squeeze(1), y_val).item()
            if val < best - 1e-6:
                best, since = val, 0
                best_state = {k: v.clone() for k, v in self.head.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    break
        self.head.load_state_dict(best_state)
        return {"epochs_run": epoch + 1, "best_val_mse": best * self.target_std ** 2}

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.encoder.save(str(out / "encoder"))
        torch.save(self.head.state_dict(), out / "head.pt")
        hidden = self.head[0].out_features
        (out / "reward_model.json").write_text(json.dumps({"hidden": hidden, "max_tokens": self.max_tokens,
                                                           "target_mean": self.target_mean, "target_std": self.target_std}))

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> "RewardModel":
        d = Path(model_dir)
        meta = json.loads((d / "reward_model.json").read_text())
        rm = cls.create(str(d / "encoder"), meta["hidden"], meta["max_tokens"], device=device)
        rm.head.load_state_dict(torch.load(d / "head.pt", map_location="cpu"))
        rm.target_mean, rm.target_std = meta["target_mean"], meta["target_std"]
        return rm


def regression_metrics(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, baseline: float) -> dict:
    """MSE (and a predict-the-train-mean baseline), Pearson, Spearman and pairwise accuracy within
    groups (share of pairs with different targets that the prediction orders the same way)."""
    from scipy.stats import pearsonr, spearmanr

    agree = total = 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if target[i] != target[j]:
                    total += 1
                    agree += (pred[i] - pred[j]) * (target[i] - target[j]) > 0
    const = np.std(pred) == 0 or np.std(target) == 0
    return {
        "mse": float(np.mean((pred - target) ** 2)),
        "baseline_mse": float(np.mean((baseline - target) ** 2)),
        "pearson": 0.0 if const else float(pearsonr(pred, target).statistic),
        "spearman": 0.0 if const else float(spearmanr(pred, target).statistic),
        "pairwise_accuracy": agree / total if total else float("nan"),
        "n": int(len(target)),
    }
