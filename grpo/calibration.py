"""Per-component reward normalisers, fitted on the labels and saved as JSON.

GRPO normalises rewards within each group, so a global affine rescale of the total reward changes
nothing; what calibration can change is the *relative* weight of components whose raw scales
differ. So every component is normalised on its own, before weighting.

====================  ========================================================================
method                fitted on the labelled scores x of one component; applied as
====================  ========================================================================
``zscore``            ``(x - mean) / max(std, min_std)``, clipped to [-max_z, max_z] (winsorised):
                      without the clip, a rare event in a near-constant component (one unsafe
                      reply where safety's std is 0.02) is worth -40 and drowns every other
                      component, in the group advantages and in the evaluation mean
``minmax``            ``(x - min) / max(max - min, min_std)``, clipped to [0, 1]
``percentile``        ``(x - p_lo) / max(p_hi - p_lo, min_std)``, clipped to [0, 1]; robust to outliers
``isotonic``          a monotone map from x to the judge's score, fitted by isotonic regression on
                      the judge-labelled rows (scikit-learn), as breakpoints; in [0, 1]
====================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from grpo.config import Config

METHODS = ("zscore", "minmax", "percentile", "isotonic")
UNIT_RANGE = ("minmax", "percentile", "isotonic")  # methods whose output lies in [0, 1]
Method = Literal["zscore", "minmax", "percentile", "isotonic"]


class CalibrationConfig(Config):
    """How each reward component is normalised (params.yaml ``calibrate``)."""

    method: Method = Field("zscore", description="isotonic maps to judge scores")
    per_component: dict[str, Method] = Field({}, description="a method per component, e.g. {length: minmax}")
    min_std: float = Field(0.02, gt=0, description="floor on a component's spread")
    max_z: float | None = Field(3.0, gt=0, description="zscore clipped to [-max_z, max_z]; null: no clip")
    percentiles: tuple[float, float] = Field((5, 95), description="for percentile")


def fit(x, method: str, min_std: float, percentiles=(5, 95), target=None, max_z: float | None = None) -> dict:
    x = np.asarray(x, dtype=float)
    if method == "zscore":
        return {"method": method, "mean": float(x.mean()), "std": float(max(x.std(), min_std)), "max_z": max_z}
    if method in ("minmax", "percentile"):
        lo, hi = (x.min(), x.max()) if method == "minmax" else np.percentile(x, percentiles)
        return {"method": method, "lo": float(lo), "scale": float(max(hi - lo, min_std))}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        target = np.asarray(target if target is not None else [], dtype=float)
        ok = np.isfinite(target)
        if ok.sum() < 2:
            raise ValueError(
                f"isotonic calibration needs judge scores; only {int(ok.sum())} labels have one "
                "(label_source 'judge'). Use another calibrate.method or a judge that answers."
            )
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x[ok], target[ok])
        return {"method": method, "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")


def apply(x, entry: Mapping) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    m = entry["method"]
    if m == "zscore":
        z = (x - entry["mean"]) / entry["std"]
        return np.clip(z, -entry["max_z"], entry["max_z"]) if entry.get("max_z") else z
    if m in ("minmax", "percentile"):
        return np.clip((x - entry["lo"]) / entry["scale"], 0.0, 1.0)
    if m == "isotonic":
        return np.interp(x, entry["x"], entry["y"])
    raise ValueError(f"calibration method {m!r} is not one of {', '.join(METHODS)}")


def fit_all(components: Mapping[str, np.ndarray], config: CalibrationConfig, target=None) -> dict:
    """One normaliser per component: ``config.method``, or the component's ``per_component`` entry."""
    unknown = set(config.per_component) - set(components)
    if unknown:
        raise KeyError(
            f"calibrate.per_component names unknown component(s) {sorted(unknown)}; known: {sorted(components)}"
        )
    return {
        k: fit(v, config.per_component.get(k, config.method), config.min_std, config.percentiles, target, config.max_z)
        for k, v in components.items()
    }


def apply_all(components: Mapping[str, np.ndarray], calibration: Mapping) -> dict[str, np.ndarray]:
    missing = set(components) - set(calibration)
    if missing:
        raise KeyError(f"calibration has no entry for component(s) {sorted(missing)}; rerun calibrate")
    return {k: apply(v, calibration[k]) for k, v in components.items()}
