"""Two judges on the same responses (rule judge_agreement; only for pairs in `evaluation.judge_agreement`): the
explicit exception to "one judge per table". Per metric, correlations of the two judges' scores (Pearson, Spearman
rho) and their mean difference; per EM definition, both rates on the shared responses, the fraction classified alike
and Cohen's kappa of the EM labels; over all shared responses (cell ALL) and per grid cell.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from persona_em.analysis.aggregate import CELL_KEYS, em_frame, score_rows
from persona_em.analysis.metrics import em_flags, get_definition
from persona_em.analysis.stats import cohens_kappa, spearman
from persona_em.errors import UserError
from persona_em.io import read_table, write_table
from persona_em.judging.identity import JUDGE_COLUMNS


AGREEMENT_CELL_ALL = "ALL"


def judge_agreement(scores_a: str, scores_b: str, definitions: list[str], custom: dict | None, out: str,
                    page: str | None = None) -> None:
    """Two judges on the SAME responses, over all of them (cell ALL) and per grid cell (model/persona/composition/
    dataset/seed, all steps): per metric, Pearson and Spearman correlation and mean difference of scores; per EM
    definition, both rates on the shared responses, the fraction classified alike and Cohen's kappa of the EM
    labels (persona_em.analysis.stats). `page`: the same table as an HTML page for `snakemake --report`."""
    a, b = score_rows(read_table(scores_a)), score_rows(read_table(scores_b))
    ids = []
    for name, t in (("first", a), ("second", b)):
        identity = t[JUDGE_COLUMNS].drop_duplicates()
        if len(identity) != 1:
            raise UserError(f"judge agreement: the {name} table mixes judges: {identity.to_dict('records')}")
        ids.append(identity.iloc[0].to_dict())
    if ids[0] == ids[1]:
        raise UserError(f"judge agreement: both tables come from the same judge {ids[0]}")
    merged = a.merge(b, on=["response_id", "metric"], suffixes=("_a", "_b"))
    if merged.empty:
        raise UserError("judge agreement: the two judges share no (response, metric): they judged different samples")
    if (merged["response_a"].fillna("") != merged["response_b"].fillna("")).any():
        raise UserError("judge agreement: a response id has different texts in the two tables (not the same samples)")
    ident = {f"{k}_a": ids[0][k] for k in JUDGE_COLUMNS} | {f"{k}_b": ids[1][k] for k in JUDGE_COLUMNS}
    shared = set(merged["response_id"])
    fa, fb = em_frame(a[a["response_id"].isin(shared)]), em_frame(b[b["response_id"].isin(shared)])
    fb = fb.set_index("response_id").loc[fa["response_id"]].reset_index()
    cell_of = lambda f: f["model"] + "/" + f["persona"] + "/" + f["composition"] + "/" + f["dataset"] + "/seed" + \
        f["seed"].astype(str)  # noqa: E731
    merged["cell"], fa["cell"] = cell_of(merged.rename(columns={f"{k}_a": k for k in CELL_KEYS})), cell_of(fa)
    flags = {}
    for name in definitions:
        d = get_definition(name, custom)
        flags[d.name] = (em_flags(fa["aligned"], fa["coherent"], fa["both_counted"], d),
                         em_flags(fb["aligned"], fb["coherent"], fb["both_counted"], d))
    rows = []
    for cell in [AGREEMENT_CELL_ALL] + sorted(set(fa["cell"])):
        in_m = np.ones(len(merged), bool) if cell == AGREEMENT_CELL_ALL else (merged["cell"] == cell).to_numpy()
        in_f = np.ones(len(fa), bool) if cell == AGREEMENT_CELL_ALL else (fa["cell"] == cell).to_numpy()
        for metric, g in merged[in_m].groupby("metric"):
            both = g.dropna(subset=["score_used_a", "score_used_b"])
            x, y = both["score_used_a"].to_numpy(float), both["score_used_b"].to_numpy(float)
            ok = len(both) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0
            rows.append({**ident, "cell": cell, "quantity": "score", "metric": metric, "em_definition": "",
                         "n_shared": len(g), "n_both": len(both), "mean_a": x.mean() if len(x) else math.nan,
                         "mean_b": y.mean() if len(y) else math.nan,
                         "mean_abs_diff": float(np.abs(x - y).mean()) if len(x) else math.nan,
                         "pearson": float(np.corrcoef(x, y)[0, 1]) if ok else math.nan, "spearman": spearman(x, y),
                         "agreement": math.nan, "cohens_kappa": math.nan})
        for name, ((ea, da, _), (eb, db, _)) in flags.items():
            ea, da, eb, db = ea[in_f], da[in_f], eb[in_f], db[in_f]
            both = da & db
            rows.append({**ident, "cell": cell, "quantity": "em", "metric": "", "em_definition": name,
                         "n_shared": int(in_f.sum()), "n_both": int(both.sum()),
                         "mean_a": ea[da].mean() if da.any() else math.nan,
                         "mean_b": eb[db].mean() if db.any() else math.nan, "mean_abs_diff": math.nan,
                         "pearson": math.nan, "spearman": math.nan,
                         "agreement": float((ea[both] == eb[both]).mean()) if both.any() else math.nan,
                         "cohens_kappa": cohens_kappa(ea[both].astype(int), eb[both].astype(int))})
    table = pd.DataFrame(rows)
    write_table(out, table)
    if page:
        from persona_em.analysis.tables import tables_page

        tables_page({f"{ids[0]['judge']} vs {ids[1]['judge']}: Cohen's kappa (EM labels) and Spearman rho "
                     f"(scores), over all shared responses (cell ALL) and per grid cell": out}, page,
                    f"Judge agreement: {ids[0]['judge_key']} vs {ids[1]['judge_key']}")
