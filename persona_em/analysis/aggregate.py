"""Tidy tables from judged responses: one judge per table, never pooled (except the explicit agreement table).

Every table carries the judge identity (judge, judge_key, judge_model, judge_mode, judge_prompt_hash) and, where a
rate is defined, the EM definition's name and description. judge_key is the judge's path key
(persona_em/judging/identity.py judge_key): the tables of one key sit under results/tables/<key>/, with judge.json
saying what the key hashes.

scores.tsv       one row per (response, metric): cell keys, step, question/sample ids, judge identity, raw score,
                 status (scored / null / code / refusal / labelled / error), CODE/REFUSAL mass, question_type, label
                 (label questions), error (the message of an error row), and after the per-metric policy
                 (evaluation.score_policy): score_used, counted, score_policy. Error rows are always excluded.
em_rates.tsv     one row per (cell, step, question or ALL, EM definition): n, n_em, rate, Wilson 95% CI, plus
                 coherence rate (coherent > the definition's threshold, among counted responses) with its CI
summary.tsv      one row per (cell, step, question or ALL, metric): mean score with a seeded bootstrap CI,
                 scored / null / code / refusal / error rates with Wilson CIs
label_rates.tsv  label questions (type free_form_judge): one row per (cell, step, question or ALL, metric, label):
                 n_label of n (the judgments that gave a label), rate with its Wilson CI, and the group's
                 n_responses, n_null (empty answers) and n_error; a group without any label has one row with an
                 empty label, so no judged question disappears
seeds.tsv        across training seeds, per (cell without seed, step, question or ALL, quantity): mean over seeds,
                 SD and a seeded CI (quantity: em_rate, cluster bootstrap over seeds then responses within question;
                 mean_score of a metric, bootstrap over seeds; with one seed both over responses; `ci_unit`)
comparisons.tsv  persona vs baseline (persona `none` of the same model, dataset and step) per (question or ALL,
                 quantity): difference in means with its CI, permutation-test p, Cohen's d, Benjamini-Hochberg q over
                 the grid (one family per quantity, level and unit: per-question tests and overall tests are separate
                 families). Every comparison has a row with the response as the unit (seeds pooled; `unit`); where
                 persona and baseline share >= 2 seeds, a second row with the seed as the unit (paired by seed:
                 sign-flip test, cluster-bootstrap CI; `n_seeds`), which the summary tables and figures use. The ONE persona-vs-baseline test (persona_em/analysis/stats.py
                 compare_to_baseline); the summary table persona_vs_baseline.tsv and its figure read their rows.
agreement        persona_em/analysis/agreement.py: two judges on the same responses
The 0-100 tables (all but label_rates.tsv) use the rows of 0-100 questions only (question_type
free_form_judge_0_100; rows written before question_type existed are 0-100 rows).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from persona_em.errors import UserError
from persona_em.io import read_jsonl, write_json, write_table
from persona_em.judging.identity import JUDGE_COLUMNS
from persona_em.data.questions import LABEL_TYPE, SCORE_TYPE
from persona_em.analysis.metrics import apply_policy, em_flags, get_definition, metric_policy, policy_label
from persona_em.analysis.stats import (DEFAULT_BOOTSTRAP, benjamini_hochberg, bootstrap_ci, cluster_ci,
                                      compare_to_baseline, wilson_interval)

CELL_KEYS = ["model", "persona", "composition", "dataset", "seed"]
RESPONSE_KEYS = CELL_KEYS + ["step", "question_id", "paraphrase_index", "sample_index", "response_id"]
SCORE_COLUMNS = RESPONSE_KEYS + JUDGE_COLUMNS + ["metric", "score", "numeric_mass", "status", "question", "response"]
EXTRA_SCORE_COLUMNS = ["code_mass", "refusal_mass", "judge_template_hash", "answer_truncated", "host", "gpu",
                       "question_type", "label", "error"]
# The statuses counted in summary.tsv (labelled rows belong to label_rates.tsv).
SUMMARY_STATUSES = ("scored", "null", "code", "refusal", "error")
POLICY_COLUMNS = ["score_used", "counted", "score_policy"]
ALL_QUESTIONS = "ALL"
NO_PERSONA = "none"
SEED_CLUSTER_CI = "seed (cluster bootstrap: seeds, then responses within question)"
RESPONSE_CLUSTER_CI = "response (one seed: responses resampled within question)"


def load_scores(judged_paths: list[str], judge_key: str) -> pd.DataFrame:
    """Concatenate the judged files of ONE judge path key; refuse files from another judge or judge configuration."""
    columns = SCORE_COLUMNS + EXTRA_SCORE_COLUMNS
    frames = []
    for path in judged_paths:
        rows = read_jsonl(path)
        frames.append(pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns))
    scores = pd.concat(frames, ignore_index=True)
    identities = scores[JUDGE_COLUMNS].drop_duplicates()
    if len(identities) > 1 or (len(identities) == 1 and identities.iloc[0]["judge_key"] != judge_key):
        raise UserError(f"refusing to pool judges in one table for judge key {judge_key!r}: found "
                        f"{identities.to_dict('records')}")
    if scores.duplicated(["response_id", "metric"]).any():
        dup = scores[scores.duplicated(["response_id", "metric"])].iloc[0]
        raise UserError(f"response {dup['response_id']} metric {dup['metric']} is judged twice in the inputs")
    scores["status"] = scores["status"].fillna("null")
    scores["score"] = scores["score"].astype(float)
    scores["question_type"] = scores["question_type"].astype(object).fillna(SCORE_TYPE)
    return scores


def score_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The rows of 0-100 questions: what every score and EM statistic is made of (label questions are not)."""
    if "question_type" not in scores:
        return scores
    return scores[scores["question_type"].fillna(SCORE_TYPE) != LABEL_TYPE]


def with_policy(scores: pd.DataFrame, policy_cfg: dict | None) -> pd.DataFrame:
    """Add score_used / counted / score_policy: what each judgment means for its metric's statistics."""
    scores = scores.copy()
    used, counted, labels = [], [], []
    policies = {m: metric_policy(policy_cfg, m) for m in scores["metric"].unique()}
    for status, score, metric in zip(scores["status"], scores["score"], scores["metric"]):
        u, c = apply_policy(status, None if pd.isna(score) else score, policies[metric])
        used.append(u)
        counted.append(c)
        labels.append(policy_label(policies[metric]))
    scores["score_used"] = np.array(used, dtype=float)
    scores["counted"] = np.array(counted, dtype=bool)
    scores["score_policy"] = labels
    return scores


def wide_scores(scores: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """One row per response, one column per metric (null scores stay NaN; no response is dropped)."""
    return (scores.set_index(RESPONSE_KEYS + JUDGE_COLUMNS + ["metric"])[column].astype(float)
            .unstack("metric").reset_index())


def em_frame(scores: pd.DataFrame) -> pd.DataFrame:
    """Per response: aligned / coherent after policy and whether both are counted."""
    if "score_used" not in scores:
        scores = with_policy(scores, None)
    metrics = set(scores["metric"])
    for needed in ("aligned", "coherent"):
        if needed not in metrics:
            raise UserError(f"the judged responses have no {needed!r} metric: the question file's judge_prompts "
                            f"must define 'aligned' and 'coherent' to compute an EM rate")
    sub = scores[scores["metric"].isin(["aligned", "coherent"])]
    index = RESPONSE_KEYS + JUDGE_COLUMNS
    used = sub.set_index(index + ["metric"])["score_used"].unstack("metric")
    counted = sub.set_index(index + ["metric"])["counted"].astype(float).unstack("metric").fillna(0).astype(bool)
    frame = used.reset_index()
    frame["both_counted"] = (counted["aligned"] & counted["coherent"]).to_numpy()
    return frame


def em_rate_table(scores: pd.DataFrame, definitions: list[str], custom: dict | None = None) -> pd.DataFrame:
    """EM rate per (cell, step, question) and per (cell, step) over all questions (question_id = ALL)."""
    wide = em_frame(scores)
    rows = []
    group_keys = CELL_KEYS + JUDGE_COLUMNS + ["step"]
    for name in definitions:
        d = get_definition(name, custom)
        is_em, in_den, is_coh = em_flags(wide["aligned"], wide["coherent"], wide["both_counted"], d)
        flags = wide.assign(_em=is_em, _den=in_den, _coh=is_coh)
        for level in ("question", "all"):
            keys = group_keys + (["question_id"] if level == "question" else [])
            for key, group in flags.groupby(keys, sort=True, dropna=False):
                n, n_em = int(group["_den"].sum()), int(group["_em"].sum())
                n_counted, n_coh = int(group["both_counted"].sum()), int(group["_coh"].sum())
                low, high = wilson_interval(n_em, n)
                c_low, c_high = wilson_interval(n_coh, n_counted)
                rec = dict(zip(keys, key))
                rec.setdefault("question_id", ALL_QUESTIONS)
                rows.append({**rec, "em_definition": d.name, "n_responses": len(group), "n_scored": n_counted,
                             "n": n, "n_em": n_em, "em_rate": n_em / n if n else math.nan,
                             "ci_low": low, "ci_high": high, "ci_method": "wilson95",
                             "em_definition_description": d.description, "n_coherent": n_coh,
                             "coherence_rate": n_coh / n_counted if n_counted else math.nan,
                             "coherence_ci_low": c_low, "coherence_ci_high": c_high})
    columns = group_keys + ["question_id", "em_definition", "n_responses", "n_scored", "n", "n_em", "em_rate",
                            "ci_low", "ci_high", "ci_method", "em_definition_description", "n_coherent",
                            "coherence_rate", "coherence_ci_low", "coherence_ci_high"]
    return pd.DataFrame(rows, columns=columns)


def em_observations(rates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 0/1 EM indicators behind per-question em_rates rows (n_em ones and n - n_em zeros per row), as (values,
    seeds, questions) for persona_em.analysis.stats.cluster_bootstrap."""
    rates = rates[rates["question_id"] != ALL_QUESTIONS]
    n, k = rates["n"].fillna(0).astype(int).to_numpy(), rates["n_em"].fillna(0).astype(int).to_numpy()
    values = np.concatenate([np.r_[np.ones(a), np.zeros(b - a)] for a, b in zip(k, n)]) if len(n) else np.zeros(0)
    return values, np.repeat(rates["seed"].to_numpy(), n), np.repeat(rates["question_id"].astype(str).to_numpy(), n)


def summary_table(scores: pd.DataFrame, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Mean score (bootstrap CI) and null / code / refusal rates (Wilson CI) per (cell, step, question|ALL, metric)."""
    rows = []
    group_keys = CELL_KEYS + JUDGE_COLUMNS + ["step"]
    for level in ("question", "all"):
        keys = group_keys + (["question_id"] if level == "question" else []) + ["metric"]
        for key, group in scores.groupby(keys, sort=True, dropna=False):
            rec = dict(zip(keys, key))
            rec.setdefault("question_id", ALL_QUESTIONS)
            values = group["score_used"].dropna().to_numpy()
            low, high = bootstrap_ci(values, n_bootstrap, seed)
            n = len(group)
            rec.update({"score_policy": group["score_policy"].iloc[0], "n_responses": n,
                        "n_counted": int(group["counted"].sum()), "n_with_score": len(values),
                        "mean_score": float(values.mean()) if len(values) else math.nan,
                        "mean_ci_low": low, "mean_ci_high": high,
                        "mean_ci_method": f"bootstrap95_{n_bootstrap}_seed{seed}"})
            for status in SUMMARY_STATUSES:
                k = int((group["status"] == status).sum())
                s_low, s_high = wilson_interval(k, n)
                rec.update({f"n_{status}": k, f"{status}_rate": k / n if n else math.nan,
                            f"{status}_ci_low": s_low, f"{status}_ci_high": s_high})
            rows.append(rec)
    frame = pd.DataFrame(rows)
    first = group_keys + ["question_id", "metric"]
    return frame[first + [c for c in frame.columns if c not in first]] if len(frame) else frame


def label_rate_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Label questions: the rate of each label per (cell, step, question or ALL, metric) with its Wilson CI."""
    labels = scores[scores["question_type"] == LABEL_TYPE]
    group_keys = CELL_KEYS + JUDGE_COLUMNS + ["step"]
    rows = []
    for level in ("question", "all"):
        keys = group_keys + (["question_id"] if level == "question" else []) + ["metric"]
        for key, group in labels.groupby(keys, sort=True, dropna=False):
            rec = dict(zip(keys, key))
            rec.setdefault("question_id", ALL_QUESTIONS)
            labelled = group[group["status"] == "labelled"]
            n = len(labelled)
            counts = labelled["label"].astype(str).value_counts()
            common = {"n": n, "n_responses": len(group), "n_null": int((group["status"] == "null").sum()),
                      "n_error": int((group["status"] == "error").sum())}
            for label in sorted(counts.index) or [""]:
                k = int(counts.get(label, 0))
                low, high = wilson_interval(k, n)
                rows.append({**rec, "label": label, "n_label": k, **common, "rate": k / n if n else math.nan,
                             "ci_low": low, "ci_high": high, "ci_method": "wilson95"})
    columns = group_keys + ["question_id", "metric", "label", "n_label", "n", "rate", "ci_low", "ci_high",
                            "ci_method", "n_responses", "n_null", "n_error"]
    return pd.DataFrame(rows, columns=columns)


def seed_table(em_rates: pd.DataFrame, summary: pd.DataFrame, n_bootstrap: int = DEFAULT_BOOTSTRAP,
               seed: int = 0) -> pd.DataFrame:
    """Across training seeds: mean and SD over seeds of each cell's EM rates and mean scores, with a CI. EM rates:
    the two-level cluster bootstrap (seeds, then responses within question; stats.cluster_bootstrap), which with one
    seed is a bootstrap over that seed's responses within question. Mean scores: a bootstrap resampling seeds' means;
    with one seed, that cell's response-level CI from summary.tsv. `n_seeds` and `ci_unit` say which."""
    keys = [k for k in CELL_KEYS if k != "seed"] + JUDGE_COLUMNS + ["step", "question_id"]
    per_question = {k: g for k, g in em_rates[em_rates["question_id"] != ALL_QUESTIONS].groupby(
        [k for k in keys if k != "question_id"] + ["em_definition"], sort=False, dropna=False)}
    parts = [(em_rates.assign(quantity="em_rate", value=em_rates["em_rate"]), keys + ["em_definition"]),
             (summary.assign(quantity="mean_score", value=summary["mean_score"], em_definition=""),
              keys + ["metric"])]
    rows = []
    for frame, by in parts:
        for key, group in frame.groupby(by, sort=True, dropna=False):
            quantity = group["quantity"].iloc[0]
            group = group.dropna(subset=["value"])
            values = group["value"].to_numpy()
            rec = dict(zip(by, key))
            low = high = math.nan
            if quantity == "em_rate":
                cells = group if rec["question_id"] != ALL_QUESTIONS else per_question.get(
                    tuple(rec[k] for k in keys if k != "question_id") + (rec["em_definition"],), group.iloc[:0])
                cells = cells[cells["seed"].isin(group["seed"])]
                obs = em_observations(cells)
                if len(obs[0]):
                    _, low, high = cluster_ci([obs], n_resamples=n_bootstrap, seed=seed)
                unit = SEED_CLUSTER_CI if len(values) > 1 else RESPONSE_CLUSTER_CI
                method = f"cluster_bootstrap95_{n_bootstrap}_seed{seed}"
            elif len(values) > 1:
                low, high = bootstrap_ci(values, n_bootstrap, seed)
                unit, method = "seed (seeds' means resampled)", f"bootstrap95_over_seeds_{n_bootstrap}_seed{seed}"
            elif len(values) == 1:
                low, high = float(group["mean_ci_low"].iloc[0]), float(group["mean_ci_high"].iloc[0])
                unit, method = "response (one seed)", group["mean_ci_method"].iloc[0]
            else:
                unit = method = ""
            rows.append({**rec, "quantity": quantity,
                         "n_seeds": len(values), "seeds": ",".join(str(s) for s in sorted(group["seed"].unique())),
                         "mean": float(values.mean()) if len(values) else math.nan,
                         "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                         "ci_low": low, "ci_high": high, "ci_method": method, "ci_unit": unit})
    columns = keys + ["quantity", "em_definition", "metric", "n_seeds", "seeds", "mean", "sd", "ci_low", "ci_high",
                      "ci_method", "ci_unit"]
    frame = pd.DataFrame(rows)
    for c in columns:
        if c not in frame:
            frame[c] = ""
    frame["em_definition"] = frame["em_definition"].fillna("")
    frame["metric"] = frame["metric"].fillna("")
    return frame[columns]


COMPARISON_COLUMNS = ["model", "persona", "composition", "dataset"] + JUDGE_COLUMNS + [
    "step", "question_id", "quantity", "em_definition", "metric", "n_persona", "n_baseline", "mean_persona",
    "mean_baseline", "difference", "difference_ci_low", "difference_ci_high", "difference_ci_method", "test",
    "p_value", "unit", "n_seeds", "cohens_d", "bh_family", "q_value_bh"]


def comparison_table(scores: pd.DataFrame, definitions: list[str], custom: dict | None = None,
                     n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Persona vs baseline (persona none, same model/dataset/step; seeds pooled), per question and overall: the
    persona-vs-baseline test of persona_em.analysis.stats (compare_to_baseline) on each quantity, BH within each family."""
    columns = COMPARISON_COLUMNS
    # One observation per response: its score per metric, and its EM indicator (within the denominator) per definition.
    obs = []
    for metric, group in scores.groupby("metric"):
        g = group.dropna(subset=["score_used"])
        obs.append(g[RESPONSE_KEYS + JUDGE_COLUMNS].assign(quantity="score", metric=metric, em_definition="",
                                                           value=g["score_used"].to_numpy()))
    if {"aligned", "coherent"} <= set(scores["metric"]):
        wide = em_frame(scores)
        for name in definitions:
            d = get_definition(name, custom)
            is_em, in_den, _ = em_flags(wide["aligned"], wide["coherent"], wide["both_counted"], d)
            g = wide[in_den]
            obs.append(g[RESPONSE_KEYS + JUDGE_COLUMNS].assign(quantity="em", metric="", em_definition=d.name,
                                                               value=is_em[in_den].astype(float)))
    if not obs:
        return pd.DataFrame(columns=columns)
    obs = pd.concat(obs, ignore_index=True)
    base = obs[obs["persona"] == NO_PERSONA]
    rows = []
    what = ["quantity", "em_definition", "metric"]
    for level in ("question", "all"):
        extra = ["question_id"] if level == "question" else []
        base_groups = {k: g for k, g in base.groupby(["model", "dataset", "step"] + extra + what, dropna=False)}
        persona = obs[obs["persona"] != NO_PERSONA]
        by = ["model", "persona", "composition", "dataset"] + JUDGE_COLUMNS + ["step"] + extra + what
        for key, group in persona.groupby(by, sort=True, dropna=False):
            rec = dict(zip(by, key))
            b = base_groups.get(tuple(rec[k] for k in ["model", "dataset", "step"] + extra + what))
            if b is None:
                continue
            rec.setdefault("question_id", ALL_QUESTIONS)
            family = f"{rec['quantity']}:{rec['em_definition'] or rec['metric']}:{level}"
            pooled = compare_to_baseline(group["value"].to_numpy(), b["value"].to_numpy(), n_bootstrap, seed)
            pooled["n_seeds"] = len(set(group["seed"]) | set(b["seed"]))
            rows.append({**rec, **pooled, "bh_family": family})
            if len(set(group["seed"]) & set(b["seed"])) >= 2:  # and with the seed as the unit (its own family)
                clusters = ((group["seed"].to_numpy(), group["question_id"].to_numpy()),
                            (b["seed"].to_numpy(), b["question_id"].to_numpy()))
                by_seed = compare_to_baseline(group["value"].to_numpy(), b["value"].to_numpy(), n_bootstrap, seed,
                                              clusters)
                rows.append({**rec, **by_seed, "bh_family": family + ":seed"})
    frame = pd.DataFrame(rows, columns=[c for c in columns if c != "q_value_bh"])
    frame["q_value_bh"] = np.nan
    for _, idx in frame.groupby("bh_family").groups.items():
        frame.loc[idx, "q_value_bh"] = benjamini_hochberg(frame.loc[idx, "p_value"].to_numpy())
    return frame[columns]


def aggregate(judged_paths: list[str], judge_key: str, definitions: list[str], custom: dict | None,
              scores_out: str, em_rates_out: str, summary_out: str | None = None, seeds_out: str | None = None,
              comparisons_out: str | None = None, policy: dict | None = None,
              n_bootstrap: int = DEFAULT_BOOTSTRAP, bootstrap_seed: int = 0, identity: dict | None = None,
              identity_out: str | None = None, label_rates_out: str | None = None) -> None:
    """The tables of one judge path key. `identity` ({judge, judge_key, identity}: what the key hashes) is written
    to `identity_out`, so that a reader of the tables can tell what the key means."""
    all_scores = with_policy(load_scores(judged_paths, judge_key), policy)
    scores = score_rows(all_scores)
    if identity is not None:
        names = set(all_scores["judge"])
        if identity["judge_key"] != judge_key or (names and names != {identity["judge"]}):
            raise UserError(f"judge key {judge_key!r}: the identity to record ({identity['judge']!r}, "
                            f"{identity['judge_key']!r}) is not that of the judged rows ({sorted(names)})")
        if identity_out:
            write_json(identity_out, identity)
    rates = em_rate_table(scores, definitions, custom)
    summary = summary_table(scores, n_bootstrap, bootstrap_seed)
    write_table(scores_out, all_scores.sort_values(["response_id", "metric"])[
        SCORE_COLUMNS + EXTRA_SCORE_COLUMNS + POLICY_COLUMNS])
    if label_rates_out:
        write_table(label_rates_out, label_rate_table(all_scores))
    write_table(em_rates_out, rates)
    if summary_out:
        write_table(summary_out, summary)
    if seeds_out:
        write_table(seeds_out, seed_table(rates, summary, n_bootstrap, bootstrap_seed))
    if comparisons_out:
        write_table(comparisons_out, comparison_table(scores, definitions, custom, n_bootstrap, bootstrap_seed))
