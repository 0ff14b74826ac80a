import math

import numpy as np
import pytest
from scipy import stats as sps

from persona_em.analysis.stats import (benjamini_hochberg, bootstrap_ci, cohens_d, compare_to_baseline, difference_ci,
                              permutation_p, wilson_interval)


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
    assert bootstrap_ci([1.0, None, 1.0]) == (1.0, 1.0)


def test_bootstrap_percentiles_are_those_of_the_resampled_means():
    """Reference: the same resamples drawn by hand (scipy draws indices with rng.integers(0, n, (B, n)))."""
    x = np.array([3.0, 9.0, 1.0, 7.0, 4.0, 12.0, 0.0])
    idx = np.random.default_rng(5).integers(0, len(x), (1000, len(x)))
    means = x[idx].mean(axis=1)
    low, high = bootstrap_ci(x, 1000, seed=5)
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_wilson_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    # the formula by hand: centre -+ half-width, z = 1.959964
    for k, n in ((1, 3), (7, 40), (0, 25), (399, 400)):
        z, p = 1.959963984540054, k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert wilson_interval(k, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-12)


def test_cohens_d_hand_computed():
    # a = 1,2,3 (mean 2, var 1), b = 3,4,5 (mean 4, var 1): pooled sd 1 -> d = -2
    assert cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    assert math.isnan(cohens_d([1], [2, 3]))
    assert math.isnan(cohens_d([1, 1], [1, 1]))


def test_permutation_p_of_em_indicators_is_exact():
    """0/1 data: the hypergeometric p equals scipy's exact enumeration of every permutation (C(12, 6) = 924)."""
    a = np.array([1, 1, 1, 0, 1, 0], dtype=float)
    b = np.array([0, 0, 1, 0, 0, 0], dtype=float)
    ref = sps.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), vectorized=True,
                               permutation_type="independent", n_resamples=10**6, alternative="two-sided")
    p, method = permutation_p(a, b)
    assert method == "permutation_exact" and p == pytest.approx(ref.pvalue, rel=1e-12)
    # by hand: 5 EM of 12, 4 of them in the persona's 6: P(K >= 4) = (C(5,4)C(7,2) + C(5,5)C(7,1)) / C(12,6)
    assert p == pytest.approx(2 * (5 * 21 + 7) / 924)
    # larger groups (no enumeration possible): still exact, and equal to the one-sided hypergeometric tails
    a, b = np.r_[np.ones(30), np.zeros(370)], np.r_[np.ones(12), np.zeros(388)]
    one_sided = sps.hypergeom(800, 42, 400).sf(29)
    assert permutation_p(a, b)[0] == pytest.approx(2 * one_sided)
    assert permutation_p(np.zeros(5), np.zeros(7))[0] == 1.0  # no EM anywhere: nothing to test against
    assert math.isnan(permutation_p([], [1.0])[0])


def test_permutation_p_of_scores_is_seeded_and_agrees_with_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(60, 15, 40), rng.normal(70, 15, 50)
    p, method = permutation_p(a, b, seed=3)
    assert method == "permutation_9999_seed3" and p == permutation_p(a, b, seed=3)[0]
    ref = sps.permutation_test((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), vectorized=True,
                               n_resamples=9999, alternative="two-sided", rng=np.random.default_rng(3))
    assert p == ref.pvalue and 1e-4 <= p < 0.05  # the Monte Carlo p never reaches 0
    # a small case is enumerated exactly
    assert permutation_p([10.0, 20.0, 30.0], [40.0, 50.0, 60.0])[1] == "permutation_exact"
    assert permutation_p([10.0, 20.0, 30.0], [40.0, 50.0, 60.0])[0] == pytest.approx(2 / 20)


def test_difference_ci_is_seeded_and_covers_the_difference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(40, 10, 60), rng.normal(70, 10, 60)
    low, high = difference_ci(a, b, 2000, seed=0)
    assert (low, high) == difference_ci(a, b, 2000, seed=0) and low < a.mean() - b.mean() < high < 0
    assert difference_ci([1.0, 1.0], [0.0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in difference_ci([], [1.0]))


def test_compare_to_baseline_fields():
    r = compare_to_baseline(np.array([10.0, 20, 30]), np.array([40.0, 50, 60]))
    assert r["n_persona"] == 3 and r["mean_persona"] == 20 and r["mean_baseline"] == 50 and r["difference"] == -30
    assert r["cohens_d"] == pytest.approx(-3.0)
    assert r["test"] == "permutation_exact" and r["p_value"] == pytest.approx(0.1)
    assert r["unit"] == "response (seeds pooled)" and r["difference_ci_method"] == "bootstrap95_2000_seed0"
    assert r["difference_ci_low"] <= -30 <= r["difference_ci_high"]


def test_benjamini_hochberg_hand_computed():
    # p = .01 .04 .03 .20 (m = 4): sorted .01 .03 .04 .20 -> .04 .06 .0533 .20 -> monotone .04 .0533 .0533 .20
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
    q = benjamini_hochberg([0.5, float("nan"), 0.9])
    assert math.isnan(q[1]) and q[0] == pytest.approx(0.9) and q[2] == pytest.approx(0.9)
    assert benjamini_hochberg([0.9, 0.95]).max() <= 1.0
    assert math.isnan(benjamini_hochberg([float("nan")])[0])


# --- seeds as the unit of replication ----------------------------------------------------------------------------
from persona_em.analysis.stats import (SEED_UNIT, cluster_bootstrap, cluster_ci, cohens_kappa, sign_flip_p,  # noqa: E402
                                       spearman)


def seeded_responses(seed_rates, n_per_question=50, questions=4, rng=None):
    """0/1 responses: per seed, per question, exactly round(rate * n) ones (values, seeds, questions)."""
    values, seeds, qs = [], [], []
    for s, rate in enumerate(seed_rates):
        for q in range(questions):
            k = round(rate * n_per_question)
            values += [1.0] * k + [0.0] * (n_per_question - k)
            seeds += [s] * n_per_question
            qs += [f"q{q}"] * n_per_question
    return np.array(values), np.array(seeds), np.array(qs)


def test_cluster_bootstrap_is_wider_than_the_response_bootstrap_when_seeds_differ():
    v, s, q = seeded_responses([0.1, 0.5, 0.2, 0.6, 0.3])  # strong seed effects
    est, low, high = cluster_ci([(v, s, q)], n_resamples=2000, seed=0)
    r_low, r_high = bootstrap_ci(v, 2000, seed=0)
    assert est == pytest.approx(0.34) and low < est < high
    assert (high - low) > 2.5 * (r_high - r_low)
    # no seed effect: about as wide as the response bootstrap
    v, s, q = seeded_responses([0.34] * 5)
    _, low, high = cluster_ci([(v, s, q)], n_resamples=2000, seed=0)
    assert (high - low) < 1.3 * (r_high - r_low)


def test_cluster_bootstrap_is_seeded_and_resamples_within_question():
    v, s, q = seeded_responses([0.1, 0.5, 0.2])
    a = cluster_bootstrap([(v, s, q)], 300, seed=3)[1]
    assert np.array_equal(a, cluster_bootstrap([(v, s, q)], 300, seed=3)[1])
    # one question where every seed's responses are all 1 and one where all 0: every resample keeps each question's
    # share, so the mean is exactly 0.5 every time (resampling across questions would vary it)
    v2 = np.array([1.0] * 10 + [0.0] * 10 + [1.0] * 10 + [0.0] * 10)
    s2 = np.array([0] * 20 + [1] * 20)
    q2 = np.array((["a"] * 10 + ["b"] * 10) * 2)
    assert np.all(cluster_bootstrap([(v2, s2, q2)], 200, seed=0)[1] == 0.5)


def test_sign_flip_test_is_exact_over_seed_pairs():
    p, method = sign_flip_p([1.0, 2.0, 3.0, 4.0])
    assert method == "sign_flip_exact" and p == pytest.approx(2 / 16)
    assert sign_flip_p([1.0, -1.0])[0] == 1.0


def test_compare_to_baseline_pairs_by_seed_with_two_or_more_seeds():
    # persona 10 points above baseline in every seed, on top of large seed effects
    pv, ps, pq = seeded_responses([0.2, 0.6, 0.4, 0.8, 0.3, 0.5])
    bv, bs, bq = seeded_responses([0.1, 0.5, 0.3, 0.7, 0.2, 0.4])
    r = compare_to_baseline(pv, bv, 1000, 0, clusters=((ps, pq), (bs, bq)))
    assert r["unit"] == SEED_UNIT and r["n_seeds"] == 6 and r["test"] == "sign_flip_exact"
    assert r["difference"] == pytest.approx(0.1) and r["p_value"] == pytest.approx(2 / 64)
    assert 0 < r["difference_ci_low"] < 0.1 < r["difference_ci_high"]
    assert r["difference_ci_method"] == "cluster_bootstrap95_1000_seed0"
    # one seed: the response unit, and the row says so
    one = compare_to_baseline(pv[ps == 0], bv[bs == 0], 500, 0, clusters=((ps[ps == 0], pq[ps == 0]),
                                                                        (bs[bs == 0], bq[bs == 0])))
    assert one["unit"] == "response (seeds pooled)" and one["n_seeds"] == 1


def test_kappa_and_spearman_known_values():
    # 2x2 table [[20, 5], [10, 15]]: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 -> kappa 0.4
    a = [1] * 25 + [0] * 25
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert cohens_kappa([1, 0, 1], [1, 0, 1]) == 1.0 and math.isnan(cohens_kappa([1, 1], [1, 1]))
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8208, abs=1e-4)
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0 and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
