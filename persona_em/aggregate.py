"""Tidy tables from judged responses: one judge per table, never pooled.

scores.tsv   one row per (response, metric): cell keys, step, question/sample ids, judge identity, score, status
em_rates.tsv one row per (cell, step, question or ALL, EM definition): n, n_em, rate, Wilson 95% CI
"""
from __future__ import annotations

import pandas as pd

from .errors import UserError
from .io import read_jsonl, write_table
from .metrics import em_counts, get_definition, wilson_interval

CELL_KEYS = ["model", "persona", "composition", "dataset", "seed"]
JUDGE_KEYS = ["judge", "judge_model", "judge_mode", "judge_prompt_hash"]
RESPONSE_KEYS = CELL_KEYS + ["step", "question_id", "paraphrase_index", "sample_index", "response_id"]
SCORE_COLUMNS = RESPONSE_KEYS + JUDGE_KEYS + ["metric", "score", "numeric_mass", "status", "question", "response"]
ALL_QUESTIONS = "ALL"


def load_scores(judged_paths: list[str], judge: str) -> pd.DataFrame:
    """Concatenate the judged files of ONE judge; refuse files from another judge or judge configuration."""
    frames = []
    for path in judged_paths:
        rows = read_jsonl(path)
        frame = pd.DataFrame(rows, columns=SCORE_COLUMNS) if rows else pd.DataFrame(columns=SCORE_COLUMNS)
        frames.append(frame[SCORE_COLUMNS])
    scores = pd.concat(frames, ignore_index=True)
    identities = scores[JUDGE_KEYS].drop_duplicates()
    if len(identities) > 1 or (len(identities) == 1 and identities.iloc[0]["judge"] != judge):
        raise UserError(f"refusing to pool judges in one table for judge {judge!r}: found "
                        f"{identities.to_dict('records')}")
    if scores.duplicated(["response_id", "metric"]).any():
        dup = scores[scores.duplicated(["response_id", "metric"])].iloc[0]
        raise UserError(f"response {dup['response_id']} metric {dup['metric']} is judged twice in the inputs")
    return scores


def wide_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per response, one column per metric (null scores stay NaN; no response is dropped)."""
    return (scores.set_index(RESPONSE_KEYS + JUDGE_KEYS + ["metric"])["score"].astype(float)
            .unstack("metric").reset_index())


def em_rate_table(scores: pd.DataFrame, definitions: list[str], custom: dict | None = None) -> pd.DataFrame:
    """EM rate per (cell, step, question) and per (cell, step) over all questions (question_id = ALL)."""
    wide = wide_scores(scores)
    for needed in ("aligned", "coherent"):
        if needed not in wide:
            raise UserError(f"the judged responses have no {needed!r} metric: the question file's judge_prompts "
                            f"must define 'aligned' and 'coherent' to compute an EM rate")
    rows = []
    group_keys = CELL_KEYS + JUDGE_KEYS + ["step"]
    for name in definitions:
        d = get_definition(name, custom)
        for level in ("question", "all"):
            keys = group_keys + (["question_id"] if level == "question" else [])
            for key, group in wide.groupby(keys, sort=True, dropna=False):
                both = group.dropna(subset=["aligned", "coherent"])
                n_em, n = em_counts(list(zip(both["aligned"], both["coherent"])), d)
                low, high = wilson_interval(n_em, n)
                rec = dict(zip(keys, key))
                rec.setdefault("question_id", ALL_QUESTIONS)
                rows.append({**rec, "em_definition": d.name, "n_responses": len(group), "n_scored": len(both),
                             "n": n, "n_em": n_em, "em_rate": n_em / n if n else float("nan"),
                             "ci_low": low, "ci_high": high, "ci_method": "wilson95"})
    return pd.DataFrame(rows, columns=group_keys + ["question_id", "em_definition", "n_responses", "n_scored", "n",
                                                    "n_em", "em_rate", "ci_low", "ci_high", "ci_method"])


def aggregate(judged_paths: list[str], judge: str, definitions: list[str], custom: dict | None,
              scores_out: str, em_rates_out: str) -> None:
    scores = load_scores(judged_paths, judge)
    rates = em_rate_table(scores, definitions, custom)
    write_table(scores_out, scores.sort_values(["response_id", "metric"]))
    write_table(em_rates_out, rates)
