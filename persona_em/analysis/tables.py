"""Summary tables from the tidy tables (scores.tsv, em_rates.tsv, comparisons.tsv) alone, and the few statistics the
figures need.

Every EM count comes from em_rates.tsv or comparisons.tsv (both made by aggregate.py with persona_em.analysis.metrics'
em_flags); every test from comparisons.tsv (persona_em.analysis.stats); every threshold test on a single
score uses the definition's own `is_misaligned` / `is_coherent`. Nothing here redefines what "EM" means.

cell_scores          one row per cell at its final step: mean/std alignment and coherence, n scored, n null, n code,
                     n refusal, n error, EM rate with its Wilson CI
checkpoint_summary   one row per cell and step: mean aligned, mean coherent, misaligned %, coherent %, EM %, n
persona_dataset_pivot  final EM % (mean over seeds with a cluster-bootstrap CI; Wilson with one seed): rows
                     model/persona/composition, one column group per dataset
persona_vs_baseline  each persona cell group vs the no-persona baseline (same model, dataset and step) at the final
                     step, EM under the figure's definition over all questions: the rows of comparisons.tsv (the one
                     persona-vs-baseline test, persona_em/analysis/stats.py; its p and BH q, not a second test; paired
                     by seed where there are >= 2 seeds) with both rates' CIs (cluster bootstrap over seeds, or Wilson
                     with one seed)
response_examples    the k lowest-aligned coherent responses of each cell at its final step (a cell without any: its
                     first k responses, with the judge's status)
onset, onset_comparisons  EM onset per cell and condition, and persona - baseline onset paired by seed
                     (persona_em/analysis/onset.py)
control_contrasts    EM(treatment) - EM(control) per benign-control pair, and its difference-in-differences against
                     the baseline (persona_em/analysis/controls.py)
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from persona_em.analysis.aggregate import ALL_QUESTIONS, CELL_KEYS, em_observations, score_rows
from persona_em.analysis.aggregate import wide_scores as aggregate_wide_scores
from persona_em.config import NO_PERSONA
from persona_em.judging.identity import JUDGE_COLUMNS
from persona_em.analysis.metrics import EMDefinition
from persona_em.provenance import FIGURE_SEED
from persona_em.analysis.stats import SEED_UNIT, bootstrap_ci, cluster_ci, wilson_interval

CONDITION_KEYS = ["model", "persona", "composition", "dataset"]  # a cell without its seed
EXAMPLES_PER_CELL = 3
EXAMPLES_RANKED, EXAMPLES_UNRANKED = "lowest aligned, coherent", "no coherent scored response: first by id"
BOOTSTRAP_RESAMPLES = 2000
# Judge statuses counted separately in cell_scores (a judge that classifies answers as code or refusal uses them;
# an error row is an answer that could not be read or a request refused for that prompt:
# persona_em/judging/__init__.py).
CODE_STATUS, REFUSAL_STATUS, NULL_STATUS, ERROR_STATUS = "code", "refusal", "null", "error"


def wide_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per response of a 0-100 question, one column per metric. Uses `score_used` (the score after the
    judge's per-metric policy for code/refusal answers) where the scores table has it, else the raw `score`; NaN
    stays NaN."""
    return aggregate_wide_scores(score_rows(scores), "score_used" if "score_used" in scores else "score")


def with_model_size(frame: pd.DataFrame, sizes: dict) -> pd.DataFrame:
    """Add `model_size_b` (parameters in billions, from config models.<name>.size_b; empty when not given)."""
    out = frame.copy()
    out.insert(out.columns.get_loc("model") + 1, "model_size_b",
               out["model"].map(lambda m: sizes.get(m)).astype(float))
    return out


def overall_rates(em_rates: pd.DataFrame, definition: str) -> pd.DataFrame:
    """em_rates rows over all questions for one EM definition."""
    return em_rates[(em_rates["question_id"] == ALL_QUESTIONS) & (em_rates["em_definition"] == definition)].copy()


def final_steps(em_rates: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated step of each cell (cells of one grid may have different schedules)."""
    return em_rates.groupby(CELL_KEYS, as_index=False)["step"].max().rename(columns={"step": "final_step"})


def at_final_step(frame: pd.DataFrame, finals: pd.DataFrame) -> pd.DataFrame:
    merged = frame.merge(finals, on=CELL_KEYS)
    return merged[merged["step"] == merged["final_step"]].drop(columns="final_step")


def pooled(rates: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """EM counts summed over the rows of each group (e.g. over seeds) with the Wilson 95% CI of the pooled rate."""
    g = rates.groupby(keys, as_index=False, sort=True).agg(n=("n", "sum"), n_em=("n_em", "sum"),
                                                             n_seeds=("seed", "nunique"), steps=("step", _steps))
    ci = [wilson_interval(int(k), int(n)) for k, n in zip(g["n_em"], g["n"])]
    g["em_rate"] = np.where(g["n"] > 0, g["n_em"] / g["n"].where(g["n"] > 0, 1), np.nan)
    g["ci_low"] = [c[0] for c in ci]
    g["ci_high"] = [c[1] for c in ci]
    g["ci_method"] = "wilson95 on responses pooled over seeds"
    return g


def _steps(s: pd.Series) -> str:
    return ",".join(str(int(v)) for v in sorted(s.unique()))




def step_curves(rates: pd.DataFrame) -> pd.DataFrame:
    """Per condition and step: mean EM rate over seeds and its band (seed bootstrap; Wilson when only one seed)."""
    rows = []
    for key, g in rates.dropna(subset=["em_rate"]).groupby(CONDITION_KEYS + ["step"], sort=True):
        if len(g) >= 2:  # 95% percentile bootstrap of the mean over seeds (resampling seeds)
            low, high = bootstrap_ci(g["em_rate"].to_numpy(), BOOTSTRAP_RESAMPLES, seed=FIGURE_SEED)
            method = f"95% bootstrap over {len(g)} seeds"
        else:
            low, high = float(g["ci_low"].iloc[0]), float(g["ci_high"].iloc[0])
            method = "wilson95 (one seed)"
        rows.append({**dict(zip(CONDITION_KEYS + ["step"], key)), "em_rate": g["em_rate"].mean(), "band_low": low,
                     "band_high": high, "band_method": method, "n_seeds": len(g), "n": int(g["n"].sum())})
    return pd.DataFrame(rows, columns=CONDITION_KEYS + ["step", "em_rate", "band_low", "band_high", "band_method",
                                                        "n_seeds", "n"])


def _scored(wide: pd.DataFrame, metric: str) -> pd.Series:
    return wide[metric] if metric in wide else pd.Series(np.nan, index=wide.index)


def _status_counts(scores: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    scores = score_rows(scores)
    aligned = scores[scores["metric"] == "aligned"]
    # read_table parses the status "null" as missing: both mean the judge gave no number
    status = aligned["status"].fillna(NULL_STATUS).astype(str)
    counts = pd.crosstab([aligned[k] for k in keys], status)
    out = pd.DataFrame(index=counts.index)
    for status, col in ((NULL_STATUS, "n_null"), (CODE_STATUS, "n_code"), (REFUSAL_STATUS, "n_refusal"),
                        (ERROR_STATUS, "n_error")):
        out[col] = counts[status] if status in counts else 0
    return out.reset_index()


def checkpoint_summary(scores: pd.DataFrame, em_rates: pd.DataFrame, d: EMDefinition, sizes: dict) -> pd.DataFrame:
    """One row per cell and step: mean aligned, mean coherent, misaligned %, coherent %, EM %, n."""
    wide = wide_scores(scores)
    wide["aligned"], wide["coherent"] = _scored(wide, "aligned"), _scored(wide, "coherent")
    keys = CELL_KEYS + ["step"]
    wide["misaligned_flag"] = wide["aligned"].map(lambda a: np.nan if pd.isna(a) else float(d.is_misaligned(a)))
    wide["coherent_flag"] = wide["coherent"].map(lambda c: np.nan if pd.isna(c) else float(d.is_coherent(c)))
    g = wide.groupby(keys, as_index=False, sort=True).agg(
        n_responses=("response_id", "count"), mean_aligned=("aligned", "mean"), mean_coherent=("coherent", "mean"),
        misaligned_pct=("misaligned_flag", "mean"), coherent_pct=("coherent_flag", "mean"))
    g["misaligned_pct"] *= 100
    g["coherent_pct"] *= 100
    rates = overall_rates(em_rates, d.name)[keys + ["n", "n_em", "em_rate", "ci_low", "ci_high", "ci_method"]]
    out = g.merge(rates, on=keys, how="left")
    out["em_pct"] = out.pop("em_rate") * 100
    out["em_ci_low_pct"] = out.pop("ci_low") * 100
    out["em_ci_high_pct"] = out.pop("ci_high") * 100
    out["em_definition"] = d.name
    return with_model_size(out, sizes)


def cell_scores(scores: pd.DataFrame, em_rates: pd.DataFrame, d: EMDefinition, sizes: dict) -> pd.DataFrame:
    """One row per cell at its final step: alignment and coherence (mean, std, n scored), n null/code/refusal, EM."""
    finals = final_steps(em_rates)
    wide = at_final_step(wide_scores(scores), finals)
    wide["aligned"], wide["coherent"] = _scored(wide, "aligned"), _scored(wide, "coherent")
    keys = CELL_KEYS + JUDGE_COLUMNS + ["step"]
    g = wide.groupby(keys, as_index=False, sort=True).agg(
        n_responses=("response_id", "count"),
        mean_aligned=("aligned", "mean"), std_aligned=("aligned", "std"), n_scored_aligned=("aligned", "count"),
        mean_coherent=("coherent", "mean"), std_coherent=("coherent", "std"),
        n_scored_coherent=("coherent", "count"))
    status = _status_counts(at_final_step(scores, finals), CELL_KEYS + ["step"])
    g = g.merge(status, on=CELL_KEYS + ["step"], how="left")
    rates = overall_rates(em_rates, d.name)[CELL_KEYS + ["step", "n", "n_em", "em_rate", "ci_low", "ci_high",
                                                         "ci_method"]]
    out = g.merge(rates, on=CELL_KEYS + ["step"], how="left").rename(columns={"step": "final_step"})
    out["em_definition"] = d.name
    return with_model_size(out, sizes)


def condition_label(frame: pd.DataFrame, with_model: bool = False) -> pd.Series:
    """persona, or persona (composition) for personas that have one; model/ in front when asked."""
    label = frame["persona"].where(frame["composition"] == NO_PERSONA,
                                   frame["persona"] + " (" + frame["composition"] + ")")
    return frame["model"] + " / " + label if with_model else label


def persona_dataset_pivot(em_rates: pd.DataFrame, d: EMDefinition, sizes: dict) -> pd.DataFrame:
    """Final EM %: one row per model/persona/composition; em %, CI, n and n_em (pooled counts) and n_seeds per
    dataset. With >= 2 seeds the rate is the mean over seeds with a cluster-bootstrap CI, with one seed the rate and
    its Wilson CI (`rate_ci`; `ci_method` names those used)."""
    final = at_final_step(em_rates[em_rates["em_definition"] == d.name], final_steps(em_rates))
    p = pd.DataFrame([{**dict(zip(CONDITION_KEYS, key)), **rate_ci(g)}
                      for key, g in final.groupby(CONDITION_KEYS, sort=True)],
                     columns=CONDITION_KEYS + ["n", "n_em", "em_rate", "ci_low", "ci_high", "n_seeds", "ci_method"])
    p["em_pct"] = p["em_rate"] * 100
    p["ci_low_pct"] = p["ci_low"] * 100
    p["ci_high_pct"] = p["ci_high"] * 100
    wide = p.pivot(index=["model", "persona", "composition"], columns="dataset",
                   values=["em_pct", "ci_low_pct", "ci_high_pct", "n", "n_em", "n_seeds"])
    wide.columns = [f"{dataset}:{value}" for value, dataset in wide.columns]
    datasets = sorted(p["dataset"].unique())
    order = [f"{ds}:{v}" for ds in datasets for v in ("em_pct", "ci_low_pct", "ci_high_pct", "n_em", "n", "n_seeds")]
    out = wide[order].reset_index()
    out["em_definition"] = d.name
    out["ci_method"] = "; ".join(sorted(set(p["ci_method"])))
    return with_model_size(out, sizes)


def significance_mark(q: float) -> str:
    if pd.isna(q):
        return ""
    return "***" if q < 0.001 else "**" if q < 0.01 else "*" if q < 0.05 else "n.s."


def rate_ci(rates: pd.DataFrame, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = FIGURE_SEED) -> dict:
    """The EM rate of a group of em_rates rows (one definition, per question and ALL) with its CI: with >= 2 seeds
    the mean over seeds of the seeds' rates and the cluster bootstrap (seeds, then responses within question);
    with one seed the rate and its Wilson interval. Says which in `n_seeds` / `ci_method`."""
    overall = rates[rates["question_id"] == ALL_QUESTIONS]
    n, n_em = int(overall["n"].sum()), int(overall["n_em"].sum())
    seeds = overall.loc[overall["n"] > 0, "seed"].nunique()  # seeds with a response in the denominator
    if seeds >= 2:
        values, s, q = em_observations(rates)
        rate, low, high = cluster_ci([(values, s, q)], n_resamples=n_resamples, seed=seed)
        method = f"cluster bootstrap95 over {seeds} seeds, then responses within question"
    else:
        rate = n_em / n if n else np.nan
        low, high = wilson_interval(n_em, n)
        method = "wilson95 on responses (one seed)"
    return {"n": n, "n_em": n_em, "em_rate": rate, "ci_low": low, "ci_high": high, "n_seeds": seeds,
            "ci_method": method}


def persona_vs_baseline(em_rates: pd.DataFrame, comparisons: pd.DataFrame, d: EMDefinition,
                        sizes: dict) -> pd.DataFrame:
    """Each persona/composition vs the no-persona baseline of the same model and dataset at the persona cells' final
    step: the comparisons.tsv row of EM under `d` over all questions (paired by seed where persona and baseline share
    >= 2 seeds, else with the response as the unit), with both rates and their CIs (`rate_ci`; n and n_em are the
    counts pooled over seeds)."""
    last = final_steps(em_rates).groupby(CONDITION_KEYS, as_index=False)["final_step"].max()
    c = comparisons[(comparisons["quantity"] == "em") & (comparisons["em_definition"] == d.name)
                    & (comparisons["question_id"] == ALL_QUESTIONS)].merge(last, on=CONDITION_KEYS)
    c = c[c["step"] == c["final_step"]].assign(_by_seed=lambda f: f["unit"] == SEED_UNIT)
    c = c.sort_values(CONDITION_KEYS + ["_by_seed"]).groupby(CONDITION_KEYS).tail(1)
    out = c[["model", "dataset", "persona", "composition", "step"]].reset_index(drop=True)
    rates = em_rates[em_rates["em_definition"] == d.name]
    for prefix, side in (("", "persona"), ("baseline_", "baseline")):
        sides = []
        for _, r in c.iterrows():
            persona, comp = (r["persona"], r["composition"]) if side == "persona" else (NO_PERSONA, NO_PERSONA)
            group = rates[(rates["model"] == r["model"]) & (rates["persona"] == persona)
                          & (rates["composition"] == comp) & (rates["dataset"] == r["dataset"])
                          & (rates["step"] == r["step"])]
            sides.append(rate_ci(group))
        sides = pd.DataFrame(sides, columns=["n", "n_em", "em_rate", "ci_low", "ci_high", "n_seeds", "ci_method"])
        for column in ("n", "n_em", "em_rate", "ci_low", "ci_high"):
            out[f"{prefix}{column}"] = sides[column].to_numpy()
        if side == "persona":
            ci_method = sides["ci_method"].to_numpy()
    for column in ("difference", "difference_ci_low", "difference_ci_high", "difference_ci_method", "test",
                   "p_value", "unit", "n_seeds", "bh_family", "q_value_bh"):
        out[column] = c[column].to_numpy()
    out["significance"] = [significance_mark(q) for q in out["q_value_bh"]]
    out["em_definition"] = d.name
    out["ci_method"] = ci_method if len(out) else []
    return with_model_size(out, sizes)


def response_examples(scores: pd.DataFrame, em_rates: pd.DataFrame, d: EMDefinition,
                      k: int = EXAMPLES_PER_CELL) -> pd.DataFrame:
    """Per cell at its final step, the k lowest-aligned coherent responses (ties broken by response id). A cell
    with no coherent scored response there (e.g. its judge wrote no number) shows its first k responses by response
    id instead, so the table always shows what every model wrote; `selection` says which rule picked a row, and
    `aligned_status` / `coherent_status` the judge's status where a score is missing."""
    wide = at_final_step(wide_scores(scores), final_steps(em_rates))
    wide["aligned"], wide["coherent"] = _scored(wide, "aligned"), _scored(wide, "coherent")
    ranked = wide.dropna(subset=["aligned", "coherent"])
    ranked = ranked[ranked["coherent"].map(d.is_coherent).astype(bool)]
    ranked = ranked.sort_values(CELL_KEYS + ["aligned", "response_id"]).assign(selection=EXAMPLES_RANKED)
    rest = wide.merge(ranked[CELL_KEYS].drop_duplicates(), on=CELL_KEYS, how="left", indicator=True)
    rest = rest[rest["_merge"] == "left_only"].drop(columns="_merge")
    rest = rest.sort_values(CELL_KEYS + ["response_id"]).assign(selection=EXAMPLES_UNRANKED)
    out = pd.concat([ranked, rest], ignore_index=True).sort_values(CELL_KEYS, kind="stable")
    out = out.groupby(CELL_KEYS, sort=True).head(k)
    out = out.assign(rank=out.groupby(CELL_KEYS).cumcount() + 1)
    out["misaligned"] = [d.is_misaligned(a) if s == EXAMPLES_RANKED else None
                         for a, s in zip(out["aligned"], out["selection"])]
    text = scores.drop_duplicates("response_id")[["response_id", "question", "response"]]
    out = out.merge(text, on="response_id", how="left")
    for metric in ("aligned", "coherent"):  # read_table reads the status "null" as missing: both mean no number
        status = scores[scores["metric"] == metric].set_index("response_id")["status"].fillna(NULL_STATUS)
        out[f"{metric}_status"] = out["response_id"].map(status).fillna(NULL_STATUS)
    out["em_definition"] = d.name
    return out[CELL_KEYS + ["step", "rank", "selection", "question_id", "response_id", "aligned", "coherent",
                            "aligned_status", "coherent_status", "misaligned", "question", "response",
                            "em_definition"]].reset_index(drop=True)


def example_score(row, metric: str) -> str:
    """An example's score as shown in tables and figures: the number, or the judge's status when there is none."""
    value = row[metric]
    return f"{value:.1f}" if pd.notna(value) else str(row[f"{metric}_status"])


def markdown_escape(text: str) -> str:
    """One Markdown table cell: no raw newlines, pipes or HTML."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>").replace("\t", " ")


def examples_rule(examples: pd.DataFrame) -> str:
    """What the examples are, for captions: the ranking rule, and the fallback when some cell needed it."""
    rule = f"The {EXAMPLES_PER_CELL} lowest-aligned coherent responses of each cell at its final step."
    unranked = examples[examples["selection"] == EXAMPLES_UNRANKED][CELL_KEYS].drop_duplicates()
    if len(unranked):
        n = examples[CELL_KEYS].drop_duplicates().shape[0]
        rule += (f" {len(unranked)} of {n} cells have no coherent scored response there: they show their first "
                 f"{EXAMPLES_PER_CELL} responses by response id, with the judge's status (e.g. null: no number) "
                 f"where a score is missing.")
    return rule


def examples_markdown(examples: pd.DataFrame, caption: str) -> str:
    cols = ["cell", "step", "rank", "question_id", "aligned", "coherent", "question", "response"]
    rows = [[f"{r['model']}/{r['persona']}/{r['composition']}/{r['dataset']}/seed{r['seed']}", r["step"], r["rank"],
             r["question_id"], example_score(r, "aligned"), example_score(r, "coherent"), r["question"], r["response"]]
            for _, r in examples.iterrows()]
    table = pd.DataFrame(rows, columns=cols).map(markdown_escape)
    text = f"# Response examples\n\n{caption}\n\n" + table.to_markdown(index=False, disable_numparse=True) + "\n"
    if examples.empty:
        text += "\n(no response at any cell's final step)\n"
    return text


# --- entry points ------------------------------------------------------------------------------------------------
def write_tables(scores_path: str, em_rates_path: str, comparisons_path: str, definition: str, custom: dict,
                 sizes: dict, repo: str, config: dict, outputs: dict) -> None:
    """Every table of TABLE_NAMES with its provenance sidecar; `outputs` maps '<name>' and '<name>_provenance'
    (and 'response_examples_md') to paths."""
    from persona_em.io import read_table, write_table, write_text
    from persona_em.analysis.metrics import get_definition
    from persona_em.analysis.controls import control_contrasts
    from persona_em.config import control_pairs
    from persona_em.analysis.onset import onset_comparison_table, onset_settings, onset_table
    from persona_em.provenance import collect, judge_identity, judge_text, write_sidecar

    scores, em_rates, comparisons = read_table(scores_path), read_table(em_rates_path), read_table(comparisons_path)
    d = get_definition(definition, custom)
    boot = {"n_resamples": 2000, "seed": 0} | (config.get("evaluation", {}).get("bootstrap") or {})
    onset = onset_settings(config)
    built = {
        "cell_scores": cell_scores(scores, em_rates, d, sizes),
        "checkpoint_summary": checkpoint_summary(scores, em_rates, d, sizes),
        "persona_dataset_pivot": persona_dataset_pivot(em_rates, d, sizes),
        "persona_vs_baseline": persona_vs_baseline(em_rates, comparisons, d, sizes),
        "response_examples": response_examples(scores, em_rates, d),
        "onset": onset_table(em_rates, onset, boot["n_resamples"], boot["seed"]),
        "onset_comparisons": onset_comparison_table(em_rates, onset, boot["n_resamples"], boot["seed"]),
        "control_contrasts": control_contrasts(em_rates, control_pairs(config), boot["n_resamples"], boot["seed"]),
    }
    shared = collect(repo, config, scores, [em_rates, comparisons], em_definition=d.name)
    for name, frame in built.items():
        write_table(outputs[name], frame)
    caption = (f"Judge {judge_text(judge_identity(scores))}. "
               f"Metric: {d.name} = {d.description}; coherent means coherent > {d.coherent_above:g}. "
               f"{examples_rule(built['response_examples'])}")
    write_text(outputs["response_examples_md"], examples_markdown(built["response_examples"], caption))
    for name in built:
        files = [outputs[name]] + ([outputs["response_examples_md"]] if name == "response_examples" else [])
        write_sidecar(outputs[f"{name}_provenance"], name, files, [scores_path, em_rates_path, comparisons_path],
                      shared)


def tables_page(table_paths: dict, out: str, title: str) -> None:
    """The summary tables as one HTML page for `snakemake --report` (TSV stays the machine-readable form)."""
    import html

    from persona_em.io import read_table, write_text

    parts = [f"<h2>{html.escape(title)}</h2>"]
    for name, path in table_paths.items():
        frame = read_table(path)
        if name == "response_examples":
            frame = frame.assign(response=frame["response"].map(lambda t: str(t)[:300]))
        parts.append(f"<h3>{html.escape(name)} ({len(frame)} rows; {html.escape(str(path))})</h3>")
        parts.append(frame.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}", border=1))
    write_text(out, "<!doctype html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title)
               + "</title></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
