"""Benign-control contrasts (table `control_contrasts`): is it the EM data, or any fine-tuning, that moves EM?

Config `analysis.controls` pairs an EM dataset with its benign twin: [{treatment: insecure, control: secure}, ...]
(both in the grid, so every persona and composition is trained on both). Per model x persona x composition x step x
EM definition x pair, from em_rates.tsv:

    contrast = EM(treatment) - EM(control)                      (this persona)
    did      = contrast(persona) - contrast(no-persona baseline) (difference in differences; empty for the baseline)

Rates are means over seeds of the seeds' rates; the CIs come from the two-level cluster bootstrap
(persona_em.analysis.stats.cluster_bootstrap: seeds resampled jointly for all the cells involved, paired by seed, then
responses within question) over the seeds every cell involved shares, when there are >= 2 of them; otherwise from
responses only (seeds pooled, resampled within question), and `n_seeds` / `ci_unit` say so.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from persona_em.analysis.aggregate import ALL_QUESTIONS, NO_PERSONA, em_observations
from persona_em.analysis.stats import DEFAULT_BOOTSTRAP, cluster_bootstrap, percentile_interval

SEED_CI = "seed (cluster bootstrap, paired by seed: seeds, then responses within question)"
RESPONSE_CI = "response (seeds pooled, resampled within question)"
COLUMNS = ["model", "persona", "composition", "step", "em_definition", "treatment", "control", "em_treatment",
           "em_control", "contrast", "contrast_ci_low", "contrast_ci_high", "baseline_contrast", "did", "did_ci_low",
           "did_ci_high", "n_treatment", "n_control", "n_seeds", "seeds", "ci_unit", "ci_method"]


def _cells(rates: pd.DataFrame, model, persona, composition, dataset, step) -> pd.DataFrame:
    return rates[(rates["model"] == model) & (rates["persona"] == persona) & (rates["composition"] == composition)
                 & (rates["dataset"] == dataset) & (rates["step"] == step)]


def _groups(frames: list[pd.DataFrame]) -> tuple[list, list, str]:
    """The response-level groups of the frames for cluster_bootstrap: over the seeds all share when >= 2, else with
    every seed pooled into one."""
    observed = [em_observations(f) for f in frames]
    shared = sorted(set.intersection(*(set(s.tolist()) for _, s, _ in observed)))
    if len(shared) >= 2:
        keep = [np.isin(s, shared) for _, s, _ in observed]
        return [(v[k], s[k], q[k]) for (v, s, q), k in zip(observed, keep)], shared, SEED_CI
    return [(v, np.zeros(len(v), dtype=int), q) for v, _, q in observed], \
        sorted(set().union(*(set(s.tolist()) for _, s, _ in observed))), RESPONSE_CI


def control_contrasts(em_rates: pd.DataFrame, pairs: list[tuple[str, str]], n_resamples: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0) -> pd.DataFrame:
    """Table `control_contrasts` (module docstring); zero rows (with the columns) when there is no pair."""
    rows = []
    rates = em_rates[em_rates["n"].fillna(0) > 0]
    for treatment, control in pairs:  # persona_em.config.control_pairs: checked at parse time
        t_rates = rates[rates["dataset"] == treatment]
        conditions = t_rates[["model", "persona", "composition", "step", "em_definition"]].drop_duplicates()
        for _, c in conditions.sort_values(["model", "persona", "composition", "em_definition", "step"]).iterrows():
            r = rates[rates["em_definition"] == c["em_definition"]]
            key = (c["model"], c["persona"], c["composition"])
            frames = [_cells(r, *key, treatment, c["step"]), _cells(r, *key, control, c["step"])]
            if frames[1].empty:
                continue
            has_baseline = c["persona"] != NO_PERSONA
            if has_baseline:
                base = [_cells(r, c["model"], NO_PERSONA, NO_PERSONA, ds, c["step"]) for ds in (treatment, control)]
                has_baseline = not (base[0].empty or base[1].empty)
                frames += base if has_baseline else []
            groups, seeds, unit = _groups(frames)
            if any(len(v) == 0 for v, _, _ in groups):
                continue
            estimate, resampled = cluster_bootstrap(groups, n_resamples, seed + len(rows))
            contrast = resampled[:, 0] - resampled[:, 1]
            low, high = percentile_interval(contrast)
            rec = {"model": c["model"], "persona": c["persona"], "composition": c["composition"],
                   "step": int(c["step"]), "em_definition": c["em_definition"], "treatment": treatment,
                   "control": control, "em_treatment": estimate[0], "em_control": estimate[1],
                   "contrast": estimate[0] - estimate[1], "contrast_ci_low": low, "contrast_ci_high": high,
                   "baseline_contrast": math.nan, "did": math.nan, "did_ci_low": math.nan, "did_ci_high": math.nan,
                   "n_treatment": int(frames[0].loc[frames[0]["question_id"] == ALL_QUESTIONS, "n"].sum()),
                   "n_control": int(frames[1].loc[frames[1]["question_id"] == ALL_QUESTIONS, "n"].sum()),
                   "n_seeds": len(seeds) if unit == SEED_CI else 1, "seeds": ",".join(str(s) for s in seeds),
                   "ci_unit": unit, "ci_method": f"percentile95_{n_resamples}_seed{seed + len(rows)}"}
            if has_baseline:
                base_contrast = resampled[:, 2] - resampled[:, 3]
                rec["baseline_contrast"] = estimate[2] - estimate[3]
                rec["did"] = rec["contrast"] - rec["baseline_contrast"]
                rec["did_ci_low"], rec["did_ci_high"] = percentile_interval(contrast - base_contrast)
            rows.append(rec)
    return pd.DataFrame(rows, columns=COLUMNS)
