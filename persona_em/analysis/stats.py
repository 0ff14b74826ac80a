"""Statistics for the tables: the one place with intervals and tests, all on scipy.stats.

- `wilson_interval`: 95% Wilson score interval of a rate (`scipy.stats.binomtest(...).proportion_ci`).
- `bootstrap_ci`: seeded percentile bootstrap (`scipy.stats.bootstrap`, 2000 resamples by default) of the mean; used
  for mean scores (resampling responses) and across training seeds (resampling seeds).
- `compare_to_baseline`: THE persona-vs-baseline test, used by every table and figure (see below).
- `benjamini_hochberg`: FDR-adjusted q-values over a family of tests (`scipy.stats.false_discovery_control`; NaN
  p-values are left out of the family).
- `cohens_d`: standardised mean difference with the pooled SD (an effect size, not a test).

The persona-vs-baseline test. A comparison is one quantity measured per response in two groups: the EM indicator
(1 = misaligned and coherent, under a named EM definition, over the responses in that definition's denominator) or a
judge's score (e.g. `aligned`), for a persona cell group and the no-persona baseline of the same model, dataset and
step. Its effect is the DIFFERENCE IN MEANS, persona - baseline (a difference in EM rates, or in mean scores), with a
percentile bootstrap 95% CI; its p-value is a two-sided PERMUTATION TEST of that same difference. Why this test:
- One statistic for both kinds of quantity, and it is the number the tables and figures report: the p-value tests
  the difference shown, not a rank statistic next to it (Mann-Whitney) or an odds ratio (Fisher).
- For the binary EM indicator the permutation distribution is known exactly (the persona group's count of EM
  responses is hypergeometric given both groups' totals), so EM rows get an exact, deterministic p-value, also for the
  rare events typical of EM (a few responses in a few hundred). Scores get a seeded Monte Carlo p-value (9999
  permutations: the smallest p is 1e-4, enough for BH over hundreds of comparisons).
- It grows into the seed-level analysis without changing the question asked: with seeds as the unit of replication,
  the same difference in means is tested by permuting within seed pairs (sign flips of per-seed differences) and
  its CI comes from a cluster bootstrap over seeds; only `unit` changes. Today the unit is the response, with the
  responses of all seeds pooled, and every row says so (`unit`).
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_BOOTSTRAP = 2000
PERMUTATIONS = 9999  # Monte Carlo permutations of the score tests (EM indicators are exact)
RESPONSE_UNIT = "response (seeds pooled)"


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n; (nan, nan) when n == 0."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _finite(values) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return x[~np.isnan(x)]


def _difference_in_means(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def bootstrap_ci(values, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (None/NaN dropped); (nan, nan) for no values, (x, x) when
    every value is x."""
    from scipy.stats import bootstrap

    x = _finite(values)
    if len(x) == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = bootstrap((x,), _mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def difference_ci(persona, baseline, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(persona) - mean(baseline), each group resampled on its own."""
    from scipy.stats import bootstrap

    a, b = _finite(persona), _finite(baseline)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    if np.all(a == a[0]) and np.all(b == b[0]):
        return float(a[0] - b[0]), float(a[0] - b[0])
    res = bootstrap((a, b), _difference_in_means, n_resamples=n_resamples, confidence_level=level,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def permutation_p(persona, baseline, seed: int = 0, n_resamples: int = PERMUTATIONS) -> tuple[float, str]:
    """Two-sided permutation p-value of mean(persona) - mean(baseline) and how it was computed.

    Two-sided as scipy defines it: twice the smaller one-sided p, capped at 1. 0/1 data: exact, from the
    hypergeometric distribution of the persona group's count given both totals (what enumerating every
    permutation gives); other data: `scipy.stats.permutation_test` (exact when there are at most `n_resamples`
    distinct permutations, else seeded Monte Carlo)."""
    from scipy.stats import hypergeom, permutation_test

    a, b = _finite(persona), _finite(baseline)
    if len(a) == 0 or len(b) == 0:
        return math.nan, ""
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        k, total, n = int(a.sum()), int(a.sum() + b.sum()), len(a)
        null = hypergeom(len(a) + len(b), total, n)
        return float(min(1.0, 2 * min(null.cdf(k), null.sf(k - 1)))), "permutation_exact"
    res = permutation_test((a, b), _difference_in_means, permutation_type="independent", vectorized=True,
                           n_resamples=n_resamples, alternative="two-sided", batch=max(1, 2**22 // (len(a) + len(b))),
                           rng=np.random.default_rng(seed))
    method = "permutation_exact" if math.comb(len(a) + len(b), len(a)) <= n_resamples else \
        f"permutation_{n_resamples}_seed{seed}"
    return float(res.pvalue), method


def cohens_d(a, b) -> float:
    """(mean(a) - mean(b)) / pooled SD (ddof 1); nan when either group has < 2 values or the pooled SD is 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    if pooled == 0:
        return math.nan
    return float((a.mean() - b.mean()) / math.sqrt(pooled))


def compare_to_baseline(persona, baseline, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """The persona-vs-baseline comparison of one quantity (module docstring): group sizes and means, the difference
    in means with its bootstrap CI, the permutation test's p-value, and Cohen's d."""
    a, b = _finite(persona), _finite(baseline)
    mean_a = float(a.mean()) if len(a) else math.nan
    mean_b = float(b.mean()) if len(b) else math.nan
    low, high = difference_ci(a, b, n_bootstrap, seed)
    p, test = permutation_p(a, b, seed)
    return {"n_persona": len(a), "n_baseline": len(b), "mean_persona": mean_a, "mean_baseline": mean_b,
            "difference": mean_a - mean_b, "difference_ci_low": low, "difference_ci_high": high,
            "difference_ci_method": f"bootstrap95_{n_bootstrap}_seed{seed}", "test": test, "p_value": p,
            "unit": RESPONSE_UNIT, "cohens_d": cohens_d(a, b)}


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values (scipy's step-up adjustment, monotone, capped at 1), NaN where p is NaN."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q
