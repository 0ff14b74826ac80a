import math

import numpy as np
import pytest
from scipy import stats as sps

from persona_em.stats import benjamini_hochberg, bootstrap_ci, cohens_d, compare_groups, mann_whitney


def test_bootstrap_is_seeded_and_covers_the_mean():
    x = np.arange(20, dtype=float)
    a = bootstrap_ci(x, 2000, seed=0)
    assert a == bootstrap_ci(x, 2000, seed=0)
    assert a != bootstrap_ci(x, 2000, seed=1)
    assert a[0] < x.mean() < a[1]
    # the percentile CI of the mean of 0..19 is close to mean -+ 1.96 * sd / sqrt(n)
    half = 1.96 * x.std(ddof=0) / math.sqrt(len(x))
    assert a[0] == pytest.approx(x.mean() - half, abs=0.6) and a[1] == pytest.approx(x.mean() + half, abs=0.6)


def test_bootstrap_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert bootstrap_ci([1.0, float("nan"), 1.0]) == (1.0, 1.0)


def test_cohens_d_hand_computed():
    # a = 1,2,3 (mean 2, var 1), b = 3,4,5 (mean 4, var 1): pooled sd 1 -> d = -2
    assert cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    assert math.isnan(cohens_d([1], [2, 3]))
    assert math.isnan(cohens_d([1, 1], [1, 1]))


def test_mann_whitney_matches_scipy_and_hand_value():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    u, p = mann_whitney(a, b)
    assert u == 0.0  # every a below every b
    ref = sps.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert p == pytest.approx(ref.pvalue)
    assert all(math.isnan(v) for v in mann_whitney([1, 1], [1, 1]))
    assert all(math.isnan(v) for v in mann_whitney([], [1, 2]))


def test_compare_groups_fields():
    r = compare_groups(np.array([10.0, 20, 30]), np.array([40.0, 50, 60]))
    assert r["n_persona"] == 3 and r["mean_persona"] == 20 and r["mean_baseline"] == 50
    assert r["cohens_d"] == pytest.approx(-3.0)


def test_benjamini_hochberg_hand_computed():
    # p = .01 .04 .03 .20 (m = 4): sorted .01 .03 .04 .20 -> .04 .06 .0533 .20 -> monotone .04 .0533 .0533 .20
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
    q = benjamini_hochberg([0.5, float("nan"), 0.9])
    assert math.isnan(q[1]) and q[0] == pytest.approx(0.9) and q[2] == pytest.approx(0.9)
    assert benjamini_hochberg([0.9, 0.95]).max() <= 1.0
