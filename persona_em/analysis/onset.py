"""EM onset: the first EM training step at which a cell's EM rate reaches a threshold (config `analysis.onset`).

Per cell (model, persona, composition, dataset, seed) and EM definition, from em_rates.tsv (all questions): the rate at
each evaluated checkpoint; the onset is the first step where rate >= threshold, linearly interpolated between that
checkpoint and the one before (a cell already at the threshold at its first checkpoint has its onset there). A cell
that never reaches it is CENSORED: its row says so (`censored`, onset empty), it is never dropped. The threshold is
absolute (an EM rate) or, with `relative: true`, a fraction of the cell's final EM rate (a cell whose final rate is 0
is censored).

onset               one row per cell (seed = its seed) and one per condition (seed = ALL) and EM definition. Cell
                    rows: onset with a response-level bootstrap CI (responses resampled within question at every
                    checkpoint). Condition rows: the mean onset over seeds with a bootstrap CI over seeds (resampling
                    seeds' onsets); with one seed, the cell's response-level CI; `n_seeds` and `ci_unit` say which.
                    A condition with a censored seed has no mean onset (`censored`, `n_censored`); `onset_lower_bound`
                    is the mean with censored seeds at their last checkpoint.
onset_comparisons   persona - baseline (persona none, same model, dataset, definition) onset difference paired by seed:
                    per-seed differences over the seeds where neither cell is censored; mean, bootstrap CI over seeds,
                    sign-flip permutation p (persona_em.analysis.stats), BH q within each EM definition. With one
                    seed: the difference with a response-level CI and no test (p empty: nothing to replicate over).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from persona_em.analysis.aggregate import ALL_QUESTIONS, CELL_KEYS, NO_PERSONA
from persona_em.analysis.stats import (DEFAULT_BOOTSTRAP, benjamini_hochberg, percentile_interval, sign_flip_p)
from persona_em.errors import UserError

DEFAULT_THRESHOLD = 0.05
CONDITION = ["model", "persona", "composition", "dataset"]
ALL_SEEDS = "ALL"
RESPONSE_CI = "response (one seed: responses resampled within question at every checkpoint)"
SEED_CI = "seed (seeds' onsets resampled)"
ONSET_COLUMNS = CONDITION + ["seed", "em_definition", "threshold", "relative", "threshold_rate", "onset_step",
                             "censored", "n_censored", "onset_lower_bound", "ci_low", "ci_high", "n_seeds", "ci_unit",
                             "ci_method", "first_step", "last_step", "final_em_rate", "steps"]
COMPARISON_COLUMNS = CONDITION + ["em_definition", "threshold", "relative", "n_seeds", "seeds", "n_censored_pairs",
                                  "onset_persona", "onset_baseline", "difference", "ci_low", "ci_high", "ci_unit",
                                  "ci_method", "test", "p_value", "bh_family", "q_value_bh"]


def onset_settings(config: dict) -> dict:
    """{threshold, relative} from config `analysis.onset`; a threshold outside [0, 1] is a UserError naming the key."""
    spec = (config.get("analysis") or {}).get("onset") or {}
    threshold = spec.get("threshold", DEFAULT_THRESHOLD)
    relative = bool(spec.get("relative", False))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        kind = "a fraction of the final EM rate" if relative else "an EM rate"
        raise UserError(f"config analysis.onset.threshold: {threshold!r} is not in [0, 1] ({kind})")
    return {"threshold": float(threshold), "relative": relative}


def onset_steps(steps, rates, thresholds) -> np.ndarray:
    """Onset per row of `rates` (shape (n, checkpoints) or (checkpoints,)) at the matching threshold: the first step
    where rate >= threshold, interpolated linearly from the checkpoint before; +inf where never reached (censored)."""
    steps = np.asarray(steps, dtype=float)
    rates = np.atleast_2d(np.asarray(rates, dtype=float))
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (rates.shape[0],))
    reached = rates >= thr[:, None]
    hit = reached.any(axis=1)
    i = reached.argmax(axis=1)
    rows = np.arange(rates.shape[0])
    prev = np.maximum(i - 1, 0)
    r0, r1 = rates[rows, prev], rates[rows, i]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(i > 0, (thr - r0) / np.where(r1 > r0, r1 - r0, 1.0), 0.0)
    onset = steps[prev] + frac * (steps[i] - steps[prev])
    return np.where(hit, onset, np.inf)


def _threshold_rates(final_rates, settings: dict) -> np.ndarray:
    """The absolute threshold per row: the threshold, or the fraction of each final rate (inf: final rate 0)."""
    final = np.asarray(final_rates, dtype=float)
    if not settings["relative"]:
        return np.full(final.shape, settings["threshold"])
    return np.where(final > 0, settings["threshold"] * final, np.inf)


def _cell_curves(em_rates: pd.DataFrame) -> dict:
    """Per (cell keys, definition): steps, overall rates, and per question the counts n and n_em at every step."""
    rates = em_rates.dropna(subset=["em_rate"])
    rates = rates[rates["n"] > 0]
    curves = {}
    for key, g in rates.groupby(CELL_KEYS + ["em_definition"], sort=True):
        overall = g[g["question_id"] == ALL_QUESTIONS].sort_values("step")
        per_q = g[g["question_id"] != ALL_QUESTIONS]
        steps = overall["step"].to_numpy()
        n = per_q.pivot_table(index="step", columns="question_id", values="n", aggfunc="sum").reindex(steps).fillna(0)
        k = per_q.pivot_table(index="step", columns="question_id", values="n_em", aggfunc="sum").reindex(steps)
        curves[key] = {"steps": steps, "rates": overall["em_rate"].to_numpy(float),
                       "n": n.to_numpy(float), "n_em": k.reindex(columns=n.columns).fillna(0).to_numpy(float)}
    return curves


def _resampled_curves(curve: dict, n_resamples: int, rng) -> np.ndarray:
    """Response-level bootstrap of a cell's EM curve: resampling a question's 0/1 EM indicators with replacement
    draws its count from Binomial(n, n_em / n); the rate is the resampled count over all questions' n."""
    n, k = curve["n"], curve["n_em"]
    p = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    counts = rng.binomial(n.astype(np.int64), p, size=(n_resamples,) + n.shape)
    total = n.sum(axis=1)
    return counts.sum(axis=2) / np.where(total > 0, total, 1)


def _finite_or_nan(x: float) -> float:
    return float(x) if np.isfinite(x) else math.nan


def cell_onsets(em_rates: pd.DataFrame, settings: dict, n_resamples: int = DEFAULT_BOOTSTRAP,
                seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """One row per cell and definition (onset, censored, response-level CI); also each cell's resampled onsets."""
    rows, resampled = [], {}
    for key, curve in _cell_curves(em_rates).items():
        rng = np.random.default_rng([seed, len(rows)])
        thr = _threshold_rates([curve["rates"][-1]], settings)[0]
        onset = onset_steps(curve["steps"], curve["rates"], thr)[0]
        boot_rates = _resampled_curves(curve, n_resamples, rng)
        boot = onset_steps(curve["steps"], boot_rates, _threshold_rates(boot_rates[:, -1], settings))
        resampled[key] = boot
        low, high = percentile_interval(boot)
        rec = dict(zip(CELL_KEYS + ["em_definition"], key))
        rows.append({**rec, "threshold": settings["threshold"], "relative": settings["relative"],
                     "threshold_rate": thr, "onset_step": _finite_or_nan(onset), "censored": not np.isfinite(onset),
                     "n_censored": int(not np.isfinite(onset)), "onset_lower_bound": _finite_or_nan(onset)
                     if np.isfinite(onset) else float(curve["steps"][-1]), "ci_low": low, "ci_high": high,
                     "n_seeds": 1, "ci_unit": RESPONSE_CI, "ci_method": f"percentile95_{n_resamples}_seed{seed}",
                     "first_step": int(curve["steps"][0]), "last_step": int(curve["steps"][-1]),
                     "final_em_rate": float(curve["rates"][-1]),
                     "steps": ",".join(str(int(s)) for s in curve["steps"])})
    return pd.DataFrame(rows, columns=ONSET_COLUMNS), resampled


def _seed_bootstrap(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of seeds' values resampled with replacement (inf, a censored seed, propagates)."""
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(n_resamples, len(values)))]
    return draws.mean(axis=1)


def onset_table(em_rates: pd.DataFrame, settings: dict, n_resamples: int = DEFAULT_BOOTSTRAP,
                seed: int = 0) -> pd.DataFrame:
    """Table `onset`: the cell rows of `cell_onsets` and one row per condition (seed ALL) and definition."""
    cells, _ = cell_onsets(em_rates, settings, n_resamples, seed)
    rows = []
    for key, g in cells.groupby(CONDITION + ["em_definition"], sort=True):
        g = g.sort_values("seed")
        onsets = g["onset_step"].fillna(np.inf).to_numpy(float)
        n_censored = int(g["censored"].sum())
        rec = {**dict(zip(CONDITION + ["em_definition"], key)), "seed": ALL_SEEDS}
        if len(g) == 1:
            low, high, unit = g["ci_low"].iloc[0], g["ci_high"].iloc[0], RESPONSE_CI
        else:
            low, high = percentile_interval(_seed_bootstrap(onsets, n_resamples, seed))
            unit = SEED_CI
        mean = onsets.mean()
        rows.append({**rec, "threshold": settings["threshold"], "relative": settings["relative"],
                     "threshold_rate": g["threshold_rate"].mean(), "onset_step": _finite_or_nan(mean),
                     "censored": n_censored > 0, "n_censored": n_censored,
                     "onset_lower_bound": float(g["onset_lower_bound"].mean()), "ci_low": low, "ci_high": high,
                     "n_seeds": len(g), "ci_unit": unit, "ci_method": f"percentile95_{n_resamples}_seed{seed}",
                     "first_step": int(g["first_step"].min()), "last_step": int(g["last_step"].max()),
                     "final_em_rate": float(g["final_em_rate"].mean()),
                     "steps": ",".join(sorted(set(",".join(g["steps"]).split(",")), key=int))})
    out = pd.concat([cells, pd.DataFrame(rows, columns=ONSET_COLUMNS)], ignore_index=True) if rows else cells
    return out[ONSET_COLUMNS]


def onset_comparison_table(em_rates: pd.DataFrame, settings: dict, n_resamples: int = DEFAULT_BOOTSTRAP,
                           seed: int = 0) -> pd.DataFrame:
    """Table `onset_comparisons`: persona - baseline onset per (model, persona, composition, dataset, definition),
    paired by seed (module docstring)."""
    cells, resampled = cell_onsets(em_rates, settings, n_resamples, seed)
    base = cells[cells["persona"] == NO_PERSONA]
    rows = []
    for key, g in cells[cells["persona"] != NO_PERSONA].groupby(CONDITION + ["em_definition"], sort=True):
        rec = dict(zip(CONDITION + ["em_definition"], key))
        b = base[(base["model"] == rec["model"]) & (base["dataset"] == rec["dataset"])
                 & (base["em_definition"] == rec["em_definition"])]
        pairs = g.merge(b, on="seed", suffixes=("_p", "_b")).sort_values("seed")
        if pairs.empty:
            continue
        complete = pairs[~pairs["censored_p"] & ~pairs["censored_b"]]
        d = (complete["onset_step_p"] - complete["onset_step_b"]).to_numpy(float)
        common = {"threshold": settings["threshold"], "relative": settings["relative"], "n_seeds": len(pairs),
                  "seeds": ",".join(str(s) for s in pairs["seed"]),
                  "n_censored_pairs": len(pairs) - len(complete),
                  "onset_persona": complete["onset_step_p"].mean() if len(complete) else math.nan,
                  "onset_baseline": complete["onset_step_b"].mean() if len(complete) else math.nan,
                  "difference": d.mean() if len(d) else math.nan}
        if len(pairs) >= 2:
            low, high = percentile_interval(_seed_bootstrap(d, n_resamples, seed)) if len(d) else (math.nan,) * 2
            p, test = sign_flip_p(d, seed) if len(d) >= 2 else (math.nan, "")
            unit = "seed (paired: seeds' onset differences resampled)"
        else:  # one seed: response-level CI of the difference of the two cells' onsets, no test
            r = pairs.iloc[0]
            kp = tuple(r[f"{k}_p"] if k != "seed" else r["seed"] for k in CELL_KEYS) + (rec["em_definition"],)
            kb = tuple(r[f"{k}_b"] if k != "seed" else r["seed"] for k in CELL_KEYS) + (rec["em_definition"],)
            with np.errstate(invalid="ignore"):
                low, high = percentile_interval(resampled[kp] - resampled[kb]) if len(d) else (math.nan,) * 2
            p, test, unit = math.nan, "none (one seed: no test)", RESPONSE_CI
        rows.append({**rec, **common, "ci_low": low, "ci_high": high, "ci_unit": unit,
                     "ci_method": f"percentile95_{n_resamples}_seed{seed}", "test": test, "p_value": p,
                     "bh_family": f"onset:{rec['em_definition']}"})
    frame = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "q_value_bh"])
    frame["q_value_bh"] = np.nan
    for _, idx in frame.groupby("bh_family").groups.items():
        frame.loc[idx, "q_value_bh"] = benjamini_hochberg(frame.loc[idx, "p_value"].to_numpy())
    return frame[COMPARISON_COLUMNS]
