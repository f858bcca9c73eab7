import numpy as np

from grpo.evaluation import paired_bootstrap_ci


def test_paired_bootstrap_ci_brackets_the_mean_and_detects_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    res = paired_bootstrap_ci(a, a + 1.0 + rng.normal(scale=0.1, size=50))
    assert res["ci_low"] < res["mean"] < res["ci_high"] and res["ci_low"] > 0.8
    null = paired_bootstrap_ci(a, a + rng.normal(scale=0.5, size=50))
    assert null["ci_low"] < 0 < null["ci_high"]
    assert paired_bootstrap_ci(a, a + 1, seed=3) == paired_bootstrap_ci(a, a + 1, seed=3)
