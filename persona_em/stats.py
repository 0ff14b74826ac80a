"""Statistics for the tables: the one place with confidence intervals and tests.

- `wilson_interval` (in metrics.py, re-exported): 95% CI of a rate.
- `bootstrap_ci`: seeded percentile bootstrap (2000 resamples by default) of a statistic (the mean by default);
  used for mean scores (resampling responses) and across training seeds (resampling seeds).
- `compare_groups`: persona vs baseline on one metric: two-sided Mann-Whitney U (scipy, with tie correction;
  asymptotic p with continuity correction) and Cohen's d with the pooled standard deviation.
- `benjamini_hochberg`: FDR-adjusted q-values over a family of tests (NaN p-values are left out of the family).
"""
from __future__ import annotations

import math

import numpy as np

from .metrics import wilson_interval  # noqa: F401  (re-exported: every interval lives in one namespace)

DEFAULT_BOOTSTRAP = 2000


def bootstrap_ci(values, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95,
                 statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over `values`; (nan, nan) for no values, (x, x) for one value."""
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                   dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_resamples, len(x)))
    stats = statistic(x[idx], axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def cohens_d(a, b) -> float:
    """(mean(a) - mean(b)) / pooled SD (ddof 1); nan when either group has < 2 values or the pooled SD is 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    if pooled == 0:
        return math.nan
    return float((a.mean() - b.mean()) / math.sqrt(pooled))


def mann_whitney(a, b) -> tuple[float, float]:
    """(U of a, two-sided p); (nan, nan) when a group is empty or all values are tied."""
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0 or np.ptp(np.concatenate([a, b])) == 0:
        return math.nan, math.nan
    res = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    return float(res.statistic), float(res.pvalue)


def compare_groups(persona, baseline) -> dict:
    u, p = mann_whitney(persona, baseline)
    return {"n_persona": len(persona), "n_baseline": len(baseline),
            "mean_persona": float(np.mean(persona)) if len(persona) else math.nan,
            "mean_baseline": float(np.mean(baseline)) if len(baseline) else math.nan,
            "mann_whitney_u": u, "p_value": p, "cohens_d": cohens_d(persona, baseline)}


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1), NaN where p is NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q
