"""EM onset (persona_em/analysis/onset.py) on planted EM curves: interpolation, censoring, seeds, persona delay."""
import math

import numpy as np
import pandas as pd
import pytest

from persona_em.analysis.onset import (ALL_SEEDS, onset_comparison_table, onset_settings, onset_steps,
                                       onset_table)
from persona_em.errors import UserError

ABS = {"threshold": 0.2, "relative": False}


def em_rates(curves: dict, n: int = 200, questions: int = 2, definition: str = "betley") -> pd.DataFrame:
    """em_rates.tsv rows (per question and ALL) for planted curves {(persona, seed): {step: rate}}."""
    rows = []
    for (persona, seed), curve in curves.items():
        comp = "none" if persona == "none" else "stacked"
        cell = {"model": "m", "persona": persona, "composition": comp, "dataset": "ds", "seed": seed,
                "em_definition": definition}
        for step, rate in curve.items():
            k = round(rate * n)
            per_q = [n // questions] * questions
            ks = [k // questions + (1 if i < k % questions else 0) for i in range(questions)]
            for i, (nq, kq) in enumerate(zip(per_q, ks)):
                rows.append({**cell, "step": step, "question_id": f"q{i}", "n": nq, "n_em": kq, "em_rate": kq / nq})
            rows.append({**cell, "step": step, "question_id": "ALL", "n": n, "n_em": k, "em_rate": k / n})
    return pd.DataFrame(rows)


def test_interpolated_onset_and_censoring():
    assert onset_steps([0, 10, 20, 30], [0, 0, 0.1, 0.3], 0.2)[0] == pytest.approx(25.0)
    assert onset_steps([0, 10, 20, 30], [0, 0, 0.1, 0.15], 0.2)[0] == math.inf
    assert onset_steps([0, 10], [0.3, 0.5], 0.2)[0] == 0  # already there at the first checkpoint
    assert onset_steps([0, 10], [0.1, 0.2], 0.2)[0] == 10  # reaching it exactly counts

    t = onset_table(em_rates({("none", 0): {0: 0, 10: 0, 20: 0.1, 30: 0.3},
                              ("p", 0): {0: 0, 10: 0, 20: 0.1, 30: 0.15}}), ABS, n_resamples=200)
    cell = t[(t["seed"] == 0) & (t["persona"] == "none")].iloc[0]
    assert cell["onset_step"] == pytest.approx(25.0) and not cell["censored"]
    assert cell["ci_low"] <= 25 <= cell["ci_high"] and cell["n_seeds"] == 1 and cell["ci_unit"].startswith("response")
    never = t[(t["seed"] == 0) & (t["persona"] == "p")].iloc[0]  # reported, not dropped
    assert never["censored"] and math.isnan(never["onset_step"]) and never["onset_lower_bound"] == 30
    assert len(t[t["seed"] == ALL_SEEDS]) == 2


def test_relative_threshold_is_a_fraction_of_the_final_rate():
    t = onset_table(em_rates({("none", 0): {0: 0, 10: 0.2, 20: 0.4}, ("p", 0): {0: 0, 10: 0, 20: 0}}),
                    {"threshold": 0.5, "relative": True}, n_resamples=100)
    cells = t[t["seed"] == 0].set_index("persona")
    assert cells.loc["none", "threshold_rate"] == pytest.approx(0.2) and cells.loc["none", "onset_step"] == 10
    assert cells.loc["p", "censored"]  # final rate 0: never rises


def test_identical_seeds_give_a_zero_width_seed_ci():
    curve = {0: 0, 10: 0, 20: 0.1, 30: 0.3}
    t = onset_table(em_rates({("none", s): curve for s in range(5)}), ABS, n_resamples=500)
    row = t[t["seed"] == ALL_SEEDS].iloc[0]
    assert row["n_seeds"] == 5 and row["ci_unit"].startswith("seed")
    assert row["onset_step"] == row["ci_low"] == row["ci_high"] == pytest.approx(25.0)


def test_planted_persona_delay_is_found_paired_by_seed():
    rng = np.random.default_rng(1)
    curves = {}
    for s in range(6):
        start = 10 + 10 * rng.integers(0, 4)  # seeds differ a lot; the persona is always 10 steps later
        for persona, delay in (("none", 0), ("p", 10)):
            curves[(persona, s)] = {step: float(np.clip((step - start - delay) / 40, 0, 1)) for step in range(0, 121, 5)}
    c = onset_comparison_table(em_rates(curves), ABS, n_resamples=1000)
    row = c.iloc[0]
    assert row["n_seeds"] == 6 and row["n_censored_pairs"] == 0
    assert row["difference"] == pytest.approx(10.0)
    assert row["ci_low"] > 0 and row["ci_low"] <= 10 <= row["ci_high"]
    assert row["test"] == "sign_flip_exact" and row["p_value"] == pytest.approx(2 / 2 ** 6)
    assert row["q_value_bh"] == pytest.approx(row["p_value"])
    # no delay: the difference is 0 and the test finds nothing
    flat = {(p, s): v for (q, s), v in curves.items() if q == "none" for p in ("none", "p")}
    row = onset_comparison_table(em_rates(flat), ABS, n_resamples=200).iloc[0]
    assert row["difference"] == 0 and row["p_value"] == 1


def test_one_seed_comparison_has_a_response_ci_and_no_test():
    c = onset_comparison_table(em_rates({("none", 0): {0: 0, 10: 0.1, 20: 0.3, 30: 0.5},
                                         ("p", 0): {0: 0, 10: 0.0, 20: 0.1, 30: 0.5}}), ABS, n_resamples=300)
    row = c.iloc[0]
    assert row["n_seeds"] == 1 and row["ci_unit"].startswith("response") and math.isnan(row["p_value"])
    assert row["difference"] == pytest.approx(22.5 - 15) and row["ci_low"] <= 7.5 <= row["ci_high"]


@pytest.mark.parametrize("bad", [1.5, -0.1, "high"])
def test_threshold_outside_unit_interval_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"config analysis.onset.threshold: .* not in \[0, 1\]"):
        onset_settings({"analysis": {"onset": {"threshold": bad}}})
    assert onset_settings({}) == {"threshold": 0.05, "relative": False}
