"""Paired comparison of two policies on the same scenarios."""

from __future__ import annotations

import numpy as np


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired units (scenarios) with a percentile bootstrap CI."""
    diff = np.asarray(b, float) - np.asarray(a, float)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": int(len(diff))}
