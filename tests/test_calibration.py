import numpy as np
import pytest

from grpo import calibration


def test_zscore_minmax_and_percentile_formulas_with_the_std_floor():
    x = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    z = calibration.fit(x, "zscore", min_std=0.5)
    assert calibration.apply([x.mean()], z)[0] == 0 and z["std"] == pytest.approx(x.std())
    assert calibration.fit([2.0, 2.0], "zscore", min_std=0.5)["std"] == 0.5
    safety = np.array([1.0] * 99 + [0.0])  # one unsafe reply: unclipped it scores -9.9
    clipped = calibration.fit(safety, "zscore", 0.02, max_z=3.0)
    assert (
        calibration.apply([0.0], calibration.fit(safety, "zscore", 0.02))[0] < -9.9
        and calibration.apply([0.0, 1.0], clipped)[0] == -3.0
    )
    assert calibration.apply([1.0], clipped)[0] == pytest.approx(0.1005, abs=1e-4)  # untouched inside the clip
    m = calibration.fit(x, "minmax", 0.01)
    assert calibration.apply([0, 50, 100, 200], m).tolist() == [0, 0.5, 1, 1]
    p = calibration.fit(x, "percentile", 0.01, percentiles=(0, 75))  # p75 = 3: the outlier 100 does not set the scale
    assert p["scale"] == 3 and calibration.apply([1.5], p)[0] == 0.5


def test_isotonic_maps_monotonically_to_judge_scores_and_needs_them():
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    judge = np.array([0.0, 0.2, 0.1, np.nan, 0.8, 1.0])  # NaN: not judged
    iso = calibration.fit(x, "isotonic", 0.01, target=judge)
    out = calibration.apply(x, iso)
    assert np.all(np.diff(out) >= 0) and out[0] == 0 and out[-1] == 1 and np.all((out >= 0) & (out <= 1))
    with pytest.raises(ValueError, match="needs judge scores"):
        calibration.fit(x, "isotonic", 0.01, target=np.full(6, np.nan))


def test_fit_all_uses_overrides_and_names_problems():
    comps = {"a": np.array([1.0, 3.0]), "b": np.array([0.0, 1.0])}
    cal = calibration.fit_all(
        comps, calibration.CalibrationConfig(method="zscore", per_component={"b": "minmax"}, min_std=0.01)
    )
    assert cal["a"]["method"] == "zscore" and cal["b"]["method"] == "minmax"
    assert calibration.apply_all(comps, cal)["a"].tolist() == [-1, 1]
    with pytest.raises(KeyError, match="unknown component"):
        calibration.fit_all(comps, calibration.CalibrationConfig(per_component={"c": "minmax"}))
    with pytest.raises(KeyError, match="rerun calibrate"):
        calibration.apply_all({"c": np.array([1.0])}, cal)
    with pytest.raises(ValueError, match="not one of"):
        calibration.fit([1.0], "sigmoid", 0.01)
    with pytest.raises(ValueError, match="per_component"):
        calibration.CalibrationConfig(per_component={"a": "sigmoid"})
