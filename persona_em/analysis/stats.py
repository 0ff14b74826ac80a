"""Statistics for the tables: the one place with intervals and tests, all on scipy.stats.

- `wilson_interval`: 95% Wilson score interval of a rate (`scipy.stats.binomtest(...).proportion_ci`).
- `bootstrap_ci`: seeded percentile bootstrap (`scipy.stats.bootstrap`, 2000 resamples by default) of the mean; used
  for mean scores (resampling responses) and across training seeds (resampling seeds).
- `compare_to_baseline`: THE persona-vs-baseline test, used by every table and figure (see below).
- `benjamini_hochberg`: FDR-adjusted q-values over a family of tests (`scipy.stats.false_discovery_control`; NaN
  p-values are left out of the family).
- `cohens_d`: standardised mean difference with the pooled SD (an effect size, not a test).
- `cluster_bootstrap`: the two-level (cluster) bootstrap over seeds x questions x responses: resample seeds, then
  responses within each question of each drawn seed; the statistic of a group is the mean over seeds of its per-seed
  means. Groups given together share the seed draw (paired by seed: persona and baseline, treatment and control).
- `sign_flip_p`: the paired permutation test over seeds (sign flips of per-seed differences).
- `cohens_kappa`, `spearman`: agreement of two judges on the same responses (EM labels; scores).

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
  its CI comes from a cluster bootstrap over seeds; only `unit` changes. With one seed (or persona and baseline
  sharing fewer than two seeds) the unit is the response, seeds pooled (`RESPONSE_UNIT`); with two or more shared
  seeds the comparison is also made with the seed as the unit (`SEED_UNIT`: per-seed differences, sign-flip test,
  cluster bootstrap CI). Every row says which (`unit`, `n_seeds`).
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_BOOTSTRAP = 2000
PERMUTATIONS = 9999  # Monte Carlo permutations of the score tests (EM indicators are exact)
RESPONSE_UNIT = "response (seeds pooled)"
SEED_UNIT = "seed (paired by seed; CI: cluster bootstrap, seeds then responses within question)"


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


def compare_to_baseline(persona, baseline, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                        clusters=None) -> dict:
    """The persona-vs-baseline comparison of one quantity (module docstring): group sizes and means, the difference
    in means with its CI, the permutation test's p-value, and Cohen's d.

    Without `clusters` the unit is the response (seeds pooled). `clusters` = ((persona seeds, persona questions),
    (baseline seeds, baseline questions)), one entry per value: when the two groups share two or more seeds the unit
    is the seed, over the shared seeds: means are means over seeds of per-seed means, the difference is the mean of
    per-seed differences, its CI the cluster bootstrap (`cluster_bootstrap`, paired by seed) and its p the sign-flip
    test (`sign_flip_p`); with fewer shared seeds it falls back to the response unit."""
    a, b = np.asarray(persona, dtype=float), np.asarray(baseline, dtype=float)
    keep_a, keep_b = ~np.isnan(a), ~np.isnan(b)
    a, b = a[keep_a], b[keep_b]
    n_seeds = 1
    if clusters is not None:
        (sa, qa), (sb, qb) = [(np.asarray(s)[k], np.asarray(q)[k]) for (s, q), k in zip(clusters, (keep_a, keep_b))]
        shared = sorted(set(sa.tolist()) & set(sb.tolist()))
        n_seeds = len(set(sa.tolist()) | set(sb.tolist()))
        if len(shared) >= 2:
            return _compare_by_seed(a, b, (sa, qa), (sb, qb), shared, n_bootstrap, seed)
    mean_a = float(a.mean()) if len(a) else math.nan
    mean_b = float(b.mean()) if len(b) else math.nan
    low, high = difference_ci(a, b, n_bootstrap, seed)
    p, test = permutation_p(a, b, seed)
    return {"n_persona": len(a), "n_baseline": len(b), "mean_persona": mean_a, "mean_baseline": mean_b,
            "difference": mean_a - mean_b, "difference_ci_low": low, "difference_ci_high": high,
            "difference_ci_method": f"bootstrap95_{n_bootstrap}_seed{seed}", "test": test, "p_value": p,
            "unit": RESPONSE_UNIT, "n_seeds": n_seeds, "cohens_d": cohens_d(a, b)}


def _compare_by_seed(a, b, clusters_a, clusters_b, shared, n_bootstrap: int, seed: int) -> dict:
    """compare_to_baseline with the seed as the unit, over the `shared` seeds."""
    in_a, in_b = np.isin(clusters_a[0], shared), np.isin(clusters_b[0], shared)
    a, b = a[in_a], b[in_b]
    groups = [(a, clusters_a[0][in_a], clusters_a[1][in_a]), (b, clusters_b[0][in_b], clusters_b[1][in_b])]
    per_seed = np.array([[v[s == k].mean() for k in shared] for v, s, _ in groups])
    diffs = per_seed[0] - per_seed[1]
    _, low, high = cluster_ci(groups, lambda m: m[..., 0] - m[..., 1], n_bootstrap, seed)
    p, test = sign_flip_p(diffs, seed)
    return {"n_persona": len(a), "n_baseline": len(b), "mean_persona": float(per_seed[0].mean()),
            "mean_baseline": float(per_seed[1].mean()), "difference": float(diffs.mean()),
            "difference_ci_low": low, "difference_ci_high": high,
            "difference_ci_method": f"cluster_bootstrap95_{n_bootstrap}_seed{seed}", "test": test, "p_value": p,
            "unit": SEED_UNIT, "n_seeds": len(shared), "cohens_d": cohens_d(a, b)}


def sign_flip_p(differences, seed: int = 0, n_resamples: int = PERMUTATIONS) -> tuple[float, str]:
    """Two-sided paired permutation p-value of the mean of per-seed differences: the null flips the sign of each
    seed's difference (`scipy.stats.permutation_test`, one sample, permutation_type='samples'; exact when
    2^n_seeds <= n_resamples). With S seeds the smallest possible p is 2 / 2^S (0.25 for 3 seeds)."""
    from scipy.stats import permutation_test

    d = _finite(differences)
    if len(d) == 0:
        return math.nan, ""
    res = permutation_test((d,), _mean, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                           alternative="two-sided", rng=np.random.default_rng(seed))
    method = "sign_flip_exact" if 2 ** len(d) <= n_resamples else f"sign_flip_{n_resamples}_seed{seed}"
    return float(min(1.0, res.pvalue)), method


def _cluster_layout(values, seeds, questions, seed_order) -> list[tuple]:
    """Per seed of `seed_order`: (values sorted by question, each response's question start and question size)."""
    values, seeds, questions = np.asarray(values, float), np.asarray(seeds), np.asarray(questions).astype(str)
    layout = []
    for s in seed_order:
        m = seeds == s
        v, q = values[m], questions[m]
        order = np.argsort(q, kind="stable")
        v, q = v[order], q[order]
        _, first, counts = np.unique(q, return_index=True, return_counts=True)
        layout.append((v, np.repeat(first, counts), np.repeat(counts, counts)))
    return layout


def cluster_groups_seeds(groups) -> list:
    """The seeds every group has (the seeds a paired cluster bootstrap resamples), sorted."""
    common = set.intersection(*(set(np.asarray(g[1]).tolist()) for g in groups))
    return sorted(common)


def cluster_bootstrap(groups, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The two-level (cluster) bootstrap of seed-averaged means, seeded.

    `groups`: (values, seeds, questions) per group, one entry per response (NaN-free). The seeds resampled are those
    of every group; each draw picks len(seeds) seeds with replacement (the same seeds for every group: paired), then
    for every drawn seed and question resamples that question's responses with replacement. A group's statistic is
    the mean over the drawn seeds of its per-seed means (each seed weighs the same). Returns (estimate of shape
    (groups,), resampled statistics of shape (n_resamples, groups)). With one seed it is the response-level
    bootstrap stratified by question."""
    seed_order = cluster_groups_seeds(groups)
    if not seed_order:
        raise ValueError("cluster_bootstrap: the groups share no seed")
    layouts = [_cluster_layout(*g, seed_order) for g in groups]
    n_seeds = len(seed_order)
    estimate = np.array([np.mean([v.mean() for v, _, _ in layout]) for layout in layouts])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    out = np.zeros((n_resamples, len(groups)))
    for slot in range(n_seeds):
        for i in range(n_seeds):
            rows = np.nonzero(drawn[:, slot] == i)[0]
            if not len(rows):
                continue
            for g, layout in enumerate(layouts):
                v, start, size = layout[i]
                idx = start + (rng.random((len(rows), len(v))) * size).astype(np.int64)
                out[rows, g] += v[idx].mean(axis=1)
    return estimate, out / n_seeds


def percentile_interval(resampled, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics (NaN ones dropped; +-inf kept: an unbounded side)."""
    x = np.asarray(resampled, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(x, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def cluster_ci(groups, combine=None, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
               level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, ci_low, ci_high) of combine(seed-averaged group means) under `cluster_bootstrap`; combine defaults
    to the first group's mean (e.g. `lambda m: m[..., 0] - m[..., 1]` for a difference)."""
    combine = combine or (lambda m: m[..., 0])
    estimate, resampled = cluster_bootstrap(groups, n_resamples, seed)
    low, high = percentile_interval(combine(resampled), level)
    return float(combine(estimate)), low, high


def cohens_kappa(a, b) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e); nan when there are no items
    or chance agreement is 1 (both raters used one and the same label throughout)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0:
        return math.nan
    labels = np.union1d(a, b)
    p_o = float(np.mean(a == b))
    p_e = float(sum(np.mean(a == k) * np.mean(b == k) for k in labels))
    return math.nan if p_e == 1 else (p_o - p_e) / (1 - p_e)


def spearman(x, y) -> float:
    """Spearman's rho (`scipy.stats.spearmanr`); nan for fewer than 2 pairs or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values (scipy's step-up adjustment, monotone, capped at 1), NaN where p is NaN."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q
