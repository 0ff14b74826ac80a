"""Projections of every response's activations, their summaries and persona retention (rule activation_projections).

activation_projections.tsv  one row per (response, reader, direction, layer): projection = dot(activation, unit
    direction). Directions: `misalignment` (the cross-fitted direction of the cell's model whose fold holds the
    cell, so the cell's own labels never built it: persona_em/activations/direction.py) and `random<k>` (k <
    n_random: Gaussian directions drawn per model and layer from the configured seed, the control; a projection on a
    unit vector does not depend on the norm, which is recorded as the misalignment direction's). `label`: the
    judge's misaligned / aligned / unlabelled (direction.py thresholds).
activation_summary.tsv  per (model, persona, composition, dataset, step, reader, direction, layer): the mean
    projection of each seed's responses, their mean over seeds with a bootstrap CI over seeds
    (persona_em.analysis.stats.bootstrap_ci; one seed gives no interval), and the AUROC of the projection against
    the judge's labels (responses of every seed, misaligned vs aligned; NaN without both classes).
persona_retention.tsv  per persona cell and step: R(t) = (p_t - p_none,0) / (p_persona,0 - p_none,0), per seed and
    averaged over seeds with a bootstrap CI over seeds, next to the EM rate (the figure's EM definition). p is the
    mean projection of the own reader's activations on the persona's direction; p_none,0 the no-persona cell of the
    same model, dataset and seed at step 0; p_persona,0 the persona cell at step 0. 1 = the persona's shift intact,
    0 = back to the baseline. The persona's direction (until constitution persona vectors exist, issue 14 stage 4) is
    the persona shift seen by the base model: the base reader's mean activation over the persona cell's step-0
    responses minus over the no-persona cell's step-0 responses (all seeds; per model, dataset, persona and
    composition; the persona-vectors recipe -- the base model reading responses written with vs without the
    persona -- with the trained persona in place of a system prompt). At every stored layer.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from persona_em.activations.store import BASE, OWN, load_activations
from persona_em.activations.direction import ALIGNED, MISALIGNED, UNLABELLED, auroc, load_direction, \
    response_labels, unit
from persona_em.analysis.stats import bootstrap_ci
from persona_em.io import read_table, stable_hash, write_table

log = logging.getLogger(__name__)

CELL_KEYS = ["model", "persona", "composition", "dataset", "seed"]
LABEL_NAMES = {MISALIGNED: "misaligned", ALIGNED: "aligned", UNLABELLED: "unlabelled"}


def random_directions(model: str, layer: int, hidden: int, n: int, seed: int) -> np.ndarray:
    """n Gaussian unit directions for one model and layer, the same in every job (a stable hash seeds them)."""
    rng = np.random.default_rng(int(stable_hash({"model": model, "layer": layer, "seed": seed}, 15), 16))
    return unit(rng.normal(size=(n, hidden)))


def projection_rows(x: np.ndarray, index: pd.DataFrame, layers: list[int], info: dict, directions: np.ndarray,
                    labels: dict, n_random: int, seed: int) -> pd.DataFrame:
    """Projections of one cell's rows (x [rows, layers, hidden] of `index`'s rows) on its fold's misalignment
    direction and on the random controls, at every layer."""
    cell = index.iloc[0]
    fold = str(cell[info["fold_by"]])
    f = info["folds"].index(fold)
    keys = index[[*CELL_KEYS, "step", "question_id", "sample_index", "response_id", "reader"]].reset_index(drop=True)
    label = keys["response_id"].map(lambda r: LABEL_NAMES[labels.get(r, UNLABELLED)])
    frames = []
    for j, layer in enumerate(layers):
        vecs = {"misalignment": unit(directions[f, j])}
        for k, v in enumerate(random_directions(cell["model"], layer, x.shape[-1], n_random, seed)):
            vecs[f"random{k}"] = v
        for name, v in vecs.items():
            frames.append(keys.assign(direction=name, layer=layer, fold=fold, projection=x[:, j] @ v, label=label,
                                      direction_norm=float(np.linalg.norm(directions[f, j]))))
    return pd.concat(frames, ignore_index=True)


def summary(proj: pd.DataFrame, n_bootstrap: int, seed: int) -> pd.DataFrame:
    keys = ["model", "persona", "composition", "dataset", "step", "reader", "direction", "layer"]
    rows = []
    for key, g in proj.groupby(keys, sort=True):
        per_seed = g.groupby("seed")["projection"].mean()
        low, high = bootstrap_ci(per_seed.to_numpy(), n_bootstrap, seed) if len(per_seed) > 1 else (math.nan,
                                                                                                     math.nan)
        lab = g["label"].map({"misaligned": MISALIGNED, "aligned": ALIGNED}).fillna(UNLABELLED).to_numpy()
        rows.append({**dict(zip(keys, key)), "n_seeds": len(per_seed), "n_responses": len(g),
                     "mean_projection": float(per_seed.mean()), "ci_low": low, "ci_high": high,
                     "ci_method": f"bootstrap95_{n_bootstrap}_seed{seed} over seeds" if len(per_seed) > 1 else
                     "one seed: no interval",
                     "n_misaligned": int((lab == MISALIGNED).sum()), "n_aligned": int((lab == ALIGNED).sum()),
                     "auroc": auroc(g["projection"].to_numpy(), lab)})
    return pd.DataFrame(rows)


def persona_retention(cells: dict, layers: list[int], em_rates: pd.DataFrame, em_definition: str,
                      n_bootstrap: int, seed: int) -> pd.DataFrame:
    """R(t) per persona cell, step and layer (module docstring). `cells`: cell tuple -> (x, index) of every row."""
    def mean_of(cell, reader, step=None):
        x, index = cells[cell]
        sel = (index["reader"] == reader).to_numpy() & (True if step is None else (index["step"] == step).to_numpy())
        return x[sel].mean(0) if sel.any() else None

    rates = em_rates[(em_rates["em_definition"] == em_definition) & (em_rates["question_id"] == "ALL")]
    rate_of = {(*(r[k] for k in CELL_KEYS), r["step"]): r["em_rate"] for _, r in rates.iterrows()}
    groups: dict = {}
    for cell in cells:
        model, persona, composition, dataset, s = cell
        if persona != "none":
            groups.setdefault((model, persona, composition, dataset), []).append(s)
    rows = []
    for (model, persona, composition, dataset), seeds in sorted(groups.items()):
        pairs = [(s, (model, "none", "none", dataset, s)) for s in sorted(seeds)]
        pairs = [(s, none) for s, none in pairs if none in cells]
        if not pairs:
            log.info("persona retention: no no-persona cell for %s/%s/%s/%s", model, persona, composition, dataset)
            continue
        base_p = [mean_of((model, persona, composition, dataset, s), BASE, 0) for s, _ in pairs]
        base_n = [mean_of(none, BASE, 0) for _, none in pairs]
        if any(v is None for v in base_p + base_n):
            continue
        direction = unit(np.mean(base_p, 0) - np.mean(base_n, 0))  # [layers, hidden]
        per_seed = {}
        for s, none in pairs:
            cell = (model, persona, composition, dataset, s)
            x, index = cells[cell]
            own = index["reader"].to_numpy() == OWN
            proj = np.einsum("nld,ld->nl", x[own], direction)
            steps = index["step"].to_numpy()[own]
            p_none0 = np.einsum("ld,ld->l", mean_of(none, OWN, 0), direction)
            p_pers0 = proj[steps == 0].mean(0)
            for t in sorted(set(steps.tolist())):
                per_seed.setdefault(t, []).append((s, (proj[steps == t].mean(0) - p_none0) / (p_pers0 - p_none0),
                                                   proj[steps == t].mean(0), p_pers0, p_none0,
                                                   rate_of.get((*cell, t), math.nan)))
        for t, values in sorted(per_seed.items()):
            for j, layer in enumerate(layers):
                r = np.array([v[1][j] for v in values])
                low, high = bootstrap_ci(r, n_bootstrap, seed) if len(r) > 1 else (math.nan, math.nan)
                em = [v[5] for v in values]
                rows.append({"model": model, "persona": persona, "composition": composition, "dataset": dataset,
                             "step": t, "layer": layer, "n_seeds": len(r), "retention": float(r.mean()),
                             "ci_low": low, "ci_high": high,
                             "p_t": float(np.mean([v[2][j] for v in values])),
                             "p_persona_0": float(np.mean([v[3][j] for v in values])),
                             "p_none_0": float(np.mean([v[4][j] for v in values])),
                             "em_rate": float(np.nanmean(em)) if not all(math.isnan(e) for e in em) else math.nan,
                             "em_definition": em_definition,
                             "persona_direction": "base reader: persona cell step 0 - no-persona cell step 0"})
    return pd.DataFrame(rows)


def activation_projections(activation_dirs: list[str], direction_dirs: dict[str, str], scores_path: str,
                           em_rates_path: str, settings: dict, em_definition: str, n_bootstrap: int, judge_key: str,
                           outputs: dict) -> None:
    """The three tables of one judge (module docstring). `direction_dirs`: model -> misalignment_direction output;
    `outputs`: table name -> path."""
    labels = response_labels(read_table(scores_path))
    infos = {m: load_direction(d) for m, d in direction_dirs.items()}
    frames, cells, layers = [], {}, None
    for d in activation_dirs:
        tensors, index, meta = load_activations(d)
        layers = meta["layers"]
        x = tensors[settings["kind"]].astype(np.float32)
        info, directions = infos[meta["model"]]
        if info["layers"] != layers:
            raise RuntimeError(f"{d}: layers {layers} differ from the direction's {info['layers']}")
        frames.append(projection_rows(x, index, layers, info, directions, labels, settings["n_random"],
                                      settings["seed"]))
        cells[tuple(meta[k] for k in CELL_KEYS)] = (x, index)
    proj = pd.concat(frames, ignore_index=True).assign(judge_key=judge_key)
    chosen = {m: i["chosen_layer"] for m, (i, _) in infos.items()}
    summ = summary(proj, n_bootstrap, settings["seed"])
    summ["chosen_layer"] = summ["layer"] == summ["model"].map(chosen)
    retention = persona_retention(cells, layers, read_table(em_rates_path), em_definition, n_bootstrap,
                                  settings["seed"])
    if len(retention):
        retention["chosen_layer"] = retention["layer"] == retention["model"].map(chosen)
    write_table(outputs["activation_projections"], proj)
    write_table(outputs["activation_summary"], summ.assign(judge_key=judge_key))
    write_table(outputs["persona_retention"], retention.assign(judge_key=judge_key))
