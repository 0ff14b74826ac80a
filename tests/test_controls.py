"""Benign-control contrasts (persona_em/analysis/controls.py) on planted EM rates."""
import math

import pandas as pd
import pytest

from persona_em.analysis.controls import COLUMNS, RESPONSE_CI, SEED_CI, control_contrasts

PAIRS = [("insecure", "secure")]


def em_rates(planted: dict, n: int = 200, questions: int = 4) -> pd.DataFrame:
    """em_rates.tsv rows (per question and ALL, definition betley, step 10) from {(persona, dataset, seed): rate}."""
    rows = []
    for (persona, dataset, seed), rate in planted.items():
        comp = "none" if persona == "none" else "stacked"
        cell = {"model": "m", "persona": persona, "composition": comp, "dataset": dataset, "seed": seed,
                "em_definition": "betley", "step": 10}
        nq, k = n // questions, round(rate * n)
        ks = [k // questions + (1 if i < k % questions else 0) for i in range(questions)]
        rows += [{**cell, "question_id": f"q{i}", "n": nq, "n_em": kq, "em_rate": kq / nq} for i, kq in enumerate(ks)]
        rows.append({**cell, "question_id": "ALL", "n": n, "n_em": k, "em_rate": k / n})
    return pd.DataFrame(rows)


PLANTED = {}
for s, (pt, bt) in enumerate([(0.3, 0.2), (0.5, 0.3), (0.4, 0.25)]):  # seed effects on the treatment
    PLANTED |= {("p", "insecure", s): pt, ("p", "secure", s): 0.1,
                ("none", "insecure", s): bt, ("none", "secure", s): 0.05}


def test_contrast_and_difference_in_differences_paired_by_seed():
    t = control_contrasts(em_rates(PLANTED), PAIRS, n_resamples=1000)
    assert list(t.columns) == COLUMNS and len(t) == 2
    p = t[t["persona"] == "p"].iloc[0]
    assert p["contrast"] == pytest.approx(0.4 - 0.1) and p["baseline_contrast"] == pytest.approx(0.25 - 0.05)
    assert p["did"] == pytest.approx(0.1) and p["did_ci_low"] <= 0.1 <= p["did_ci_high"]
    assert 0 < p["contrast_ci_low"] < 0.3 < p["contrast_ci_high"]
    assert p["n_seeds"] == 3 and p["ci_unit"] == SEED_CI and p["seeds"] == "0,1,2"
    assert (p["treatment"], p["control"], p["step"]) == ("insecure", "secure", 10)
    base = t[t["persona"] == "none"].iloc[0]
    assert base["contrast"] == pytest.approx(0.2) and math.isnan(base["did"])


def test_one_seed_gives_response_level_cis_and_says_so():
    one = {k: v for k, v in PLANTED.items() if k[2] == 0}
    p = control_contrasts(em_rates(one), PAIRS, n_resamples=500)
    p = p[p["persona"] == "p"].iloc[0]
    assert p["n_seeds"] == 1 and p["ci_unit"] == RESPONSE_CI
    assert p["contrast"] == pytest.approx(0.2) and p["did"] == pytest.approx(0.2 - 0.15)
    assert p["contrast_ci_low"] < 0.2 < p["contrast_ci_high"]


def test_no_pair_means_zero_rows_with_the_columns():
    t = control_contrasts(em_rates(PLANTED), [])
    assert t.empty and list(t.columns) == COLUMNS
