"""A learned reward model: a sentence-transformers encoder plus a small MLP regression head.

The whole conversation (user and agent turns, with roles) is encoded. When it exceeds the token
budget, the oldest turns are dropped first, since the latest exchange matters most for the reply.
Training (:meth:`RewardModel.fit`) has two phases: the head on frozen encoder embeddings, then,
optionally, encoder and head together at a lower learning rate. The loss is MSE on standardised
scores plus, optionally, a Bradley-Terry loss on pairs within a scenario's group.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grpo.config import FitConfig
from grpo.models import resolve_spec


def load_encoder(spec: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    path, _ = resolve_spec(spec)  # raises if a package or directory is missing: no random fallback
    return SentenceTransformer(path, device=device)


def bradley_terry(pred: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(s_i - s_j) averaged over pairs (i, j) in one group with y_i > y_j; 0 if none."""
    better = (groups[:, None] == groups[None, :]) & (y[:, None] > y[None, :])
    if not better.any():
        return pred.sum() * 0.0
    diff = pred[:, None] - pred[None, :]
    return -nn.functional.logsigmoid(diff[better]).mean()


def warmup(opt, total_steps: int, fraction: float):
    n = max(1, int(total_steps * fraction))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / n))


class RewardModel:
    def __init__(self, encoder, head: nn.Module, max_tokens: int = 256):
        self.encoder = encoder
        self.head = head
        self.max_tokens = max_tokens
        # The head is trained on standardised targets, so an untrained head predicts the mean.
        self.target_mean, self.target_std = 0.0, 1.0
        # Turns recur across a group's conversations (system prompt, opening, scripted user turns),
        # so their token counts are cached; whole-conversation embeddings are cached too.
        self._turn_tokens: dict[str, int] = {}
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = 4096

    @classmethod
    def create(cls, encoder_spec: str, hidden: int = 128, max_tokens: int = 256, seed: int = 0, device: str = "cpu"):
        encoder = load_encoder(encoder_spec, device)
        torch.manual_seed(seed)
        dim = encoder.get_embedding_dimension()
        head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(device)
        nn.init.zeros_(head[2].weight)  # start from "predict the mean"
        nn.init.zeros_(head[2].bias)
        return cls(encoder, head, max_tokens)

    def n_tokens(self, turn: str) -> int:
        n = self._turn_tokens.get(turn)
        if n is None:
            n = self._turn_tokens[turn] = len(self.encoder.tokenizer(turn, add_special_tokens=False)["input_ids"])
        return n

    def text(self, conversation: list[dict]) -> str:
        """Role-tagged turns, newest kept first, within ``max_tokens`` encoder tokens."""
        turns = [f"{m['role']}: {m.get('content') or ''}" for m in conversation if m["role"] != "system"]
        kept, used = [], 0
        for t in reversed(turns):
            n = self.n_tokens(t)
            if kept and used + n > self.max_tokens:
                break
            kept.append(t)
            used += n
        return "\n".join(reversed(kept))

    def embed(self, conversations: list[list[dict]], batch_size: int = 32) -> torch.Tensor:
        """Embeddings of the conversations; texts already embedded come from the cache."""
        texts = [self.text(c) for c in conversations]
        todo = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        if todo:
            new = self.encoder.encode(
                todo, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
            ).cpu()
            for t, e in zip(todo, new):
                self._embeddings[t] = e
        out = torch.stack([self._embeddings[t] for t in texts]) if texts else torch.zeros(0)
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)
        return out

    @torch.no_grad()
    def score_embeddings(self, x: torch.Tensor) -> np.ndarray:
        self.head.eval()
        device = next(self.head.parameters()).device
        return (self.head(x.to(device)).squeeze(1) * self.target_std + self.target_mean).cpu().numpy()

    def predict(self, conversations: list[list[dict]]) -> np.ndarray:
        return self.score_embeddings(self.embed(conversations))

    def _loss(self, pred, y, groups, cfg: FitConfig) -> torch.Tensor:
        loss = nn.functional.mse_loss(pred, y)
        if cfg.pairwise_weight:
            loss = loss + cfg.pairwise_weight * bradley_terry(pred, y, groups)
        return loss

    def fit(
        self,
        train: list[list[dict]],
        y: torch.Tensor,
        groups: torch.Tensor,
        val: list[list[dict]],
        y_val: torch.Tensor,
        groups_val: torch.Tensor,
        cfg: FitConfig,
    ) -> dict:
        """Phase 1 trains the head on frozen, cached embeddings; phase 2 (``unfreeze_epochs``)
        fine-tunes encoder and head together at the lower ``encoder_learning_rate``. Each phase has
        linear warmup, gradient clipping and early stopping on the validation loss, and ends at its
        best state."""
        self.target_mean, self.target_std = float(y.mean()), float(max(y.std(), 1e-6))
        y, y_val = (y - self.target_mean) / self.target_std, (y_val - self.target_mean) / self.target_std
        device = next(self.head.parameters()).device
        y, y_val, groups, groups_val = y.to(device), y_val.to(device), groups.to(device), groups_val.to(device)
        x, x_val = self.embed(train).to(device), self.embed(val).to(device)

        def val_loss(xv) -> float:
            self.head.eval()
            with torch.no_grad():
                return self._loss(self.head(xv).squeeze(1), y_val, groups_val, cfg).item()

        opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sched = warmup(opt, cfg.epochs, cfg.warmup_fraction)
        best, best_state, since, epoch = val_loss(x_val), copy.deepcopy(self.head.state_dict()), 0, 0
        for epoch in range(1, cfg.epochs + 1):  # noqa: B007  (reported after the loop)
            self.head.train()
            opt.zero_grad()
            self._loss(self.head(x).squeeze(1), y, groups, cfg).backward()
            nn.utils.clip_grad_norm_(self.head.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            v = val_loss(x_val)
            if v < best - 1e-6:
                best, best_state, since = v, copy.deepcopy(self.head.state_dict()), 0
            elif (since := since + 1) >= cfg.patience:
                break
        self.head.load_state_dict(best_state)
        result = {"epochs_run": epoch, "best_val_loss": best, "phase1_val_loss": best}
        if cfg.unfreeze_epochs:
            result.update(self._fit_unfrozen(train, y, groups, val, y_val, groups_val, cfg, best))
        self._embeddings.clear()  # the encoder may have changed
        return result

    def _fit_unfrozen(self, train, y, groups, val, y_val, groups_val, cfg: FitConfig, best: float) -> dict:
        enc, device = self.encoder, next(self.head.parameters()).device
        texts, texts_val = [self.text(c) for c in train], [self.text(c) for c in val]

        def forward(batch_texts):
            features = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in enc.preprocess(batch_texts).items()}
            return self.head(enc(features)["sentence_embedding"]).squeeze(1)

        def val_loss() -> float:
            enc.eval()
            self.head.eval()
            with torch.no_grad():
                pred = torch.cat(
                    [forward(texts_val[i : i + cfg.batch_size]) for i in range(0, len(texts_val), cfg.batch_size)]
                )
                return self._loss(pred, y_val, groups_val, cfg).item()

        params = [
            {"params": enc.parameters(), "lr": cfg.encoder_learning_rate},
            {"params": self.head.parameters(), "lr": cfg.encoder_learning_rate * 10},
        ]
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        steps = cfg.unfreeze_epochs * -(-len(texts) // cfg.batch_size)
        sched = warmup(opt, steps, cfg.warmup_fraction)
        best_state = (copy.deepcopy(enc.state_dict()), copy.deepcopy(self.head.state_dict()))
        gen = torch.Generator().manual_seed(0)
        epochs = 0
        for epochs in range(1, cfg.unfreeze_epochs + 1):  # noqa: B007  (reported after the loop)
            enc.train()
            self.head.train()
            for idx in torch.randperm(len(texts), generator=gen).split(cfg.batch_size):
                opt.zero_grad()
                loss = self._loss(forward([texts[i] for i in idx]), y[idx.to(device)], groups[idx.to(device)], cfg)
                loss.backward()
                nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], cfg.max_grad_norm)
                opt.step()
                sched.step()
            v = val_loss()
            if v < best - 1e-6:
                best, best_state = v, (copy.deepcopy(enc.state_dict()), copy.deepcopy(self.head.state_dict()))
            else:
                break  # one worse epoch ends fine-tuning: it overfits fast on a few hundred labels
        enc.load_state_dict(best_state[0])
        self.head.load_state_dict(best_state[1])
        enc.eval()
        return {"unfrozen_epochs_run": epochs, "best_val_loss": best}

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.encoder.save(str(out / "encoder"))
        torch.save(self.head.state_dict(), out / "head.pt")
        hidden = self.head[0].out_features
        (out / "reward_model.json").write_text(
            json.dumps(
                {
                    "hidden": hidden,
                    "max_tokens": self.max_tokens,
                    "target_mean": self.target_mean,
                    "target_std": self.target_std,
                }
            )
        )

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> RewardModel:
        d = Path(model_dir)
        meta = json.loads((d / "reward_model.json").read_text())
        rm = cls.create(str(d / "encoder"), meta["hidden"], meta["max_tokens"], device=device)
        rm.head.load_state_dict(torch.load(d / "head.pt", map_location=device, weights_only=True))
        rm.target_mean, rm.target_std = meta["target_mean"], meta["target_std"]
        return rm


def held_out_scenarios(ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the distinct scenario ids (at least one), for validation by scenario:
    no scenario's conversations sit on both sides."""
    ranked = sorted(set(ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    return set(ranked[: max(1, round(len(ranked) * fraction))])


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
