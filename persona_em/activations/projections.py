"""Projections of every response's activations and their summaries (rule activation_projections, per judge), and
persona retention (rule persona_retention, judge-free).

activation_projections.tsv  one row per (response, reader, direction, layer): projection = dot(activation, unit
    direction). Directions: `misalignment` (the cross-fitted direction of the cell's model whose fold holds the
    cell, so the cell's own labels never built it: persona_em/activations/direction.py; only when the direction is
    built, analysis.activations.misalignment_direction), `persona:<name>` (the persona vector of each grid persona
    on the cell's model: persona_em/activations/persona_vectors.py) and `random<k>` (k < n_random: Gaussian
    directions drawn per model and layer from the configured seed, the control). `direction_norm`: the norm of the
    persona vector, or of the misalignment direction for it and the random controls (a projection on a unit vector
    does not depend on it); empty (NaN) for the random controls when no direction is built. `fold`: the cell's
    cross-fitting fold (its value of the direction's fold key), empty without a direction. `label`: the judge's
    misaligned / aligned / unlabelled (direction.py thresholds; unlabelled also where the judge gave no score).
activation_summary.tsv  per (model, persona, composition, dataset, step, reader, direction, layer): the mean
    projection of each seed's responses, their mean over seeds with a bootstrap CI over seeds
    (persona_em.analysis.stats.bootstrap_ci; one seed gives no interval), and the AUROC of the projection against
    the judge's labels (responses of every seed, misaligned vs aligned). `auroc_status` says whether it was
    computed: `computed`, else why not (`no misaligned response`, `no aligned response`, `no labelled response`;
    `auroc` is then empty): the counts are `n_misaligned`, `n_aligned` of `n_responses`. `chosen_layer`: for a
    persona direction the persona vector's chosen layer, for the misalignment direction and the random controls the
    direction's (false everywhere for them without a direction).
persona_retention.tsv  (tables/activations/, no judge) per persona vector P of a model, cell, step and layer:
    R(t) = (p_t - p_none,0) / (p_P,0 - p_none,0), averaged over seeds with a bootstrap CI over seeds. p = the mean
    projection, on P's unit persona vector, of the cell's own reader's activations (the model that wrote the
    responses); p_none,0 = the no-persona cell of the same model, dataset and seed at step 0; p_P,0 = the mean over
    P's cells of that model, dataset and seed whose step-0 model runs the persona (stacked, merged, posthoc) at step
    0. Rows for P's cells (every composition) and for the no-persona cell (R(0) = 0 there by definition); with one
    persona-on composition R(0) = 1 for it. 1 = the persona's shift intact, 0 = back to the no-persona baseline.
    `chosen_layer`: P's layer of highest held-out separation. NaN where p_P,0 = p_none,0 (no persona shift at that
    layer, e.g. the embeddings when both cells wrote the same texts). Judge labels are not used.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from persona_em.activations.direction import ALIGNED, MISALIGNED, UNLABELLED, auroc, load_direction, \
    response_labels, unit
from persona_em.activations.persona_vectors import NO_PERSONA, load_persona_vector
from persona_em.activations.store import OWN, load_activations
from persona_em.analysis.stats import bootstrap_ci
from persona_em.errors import UserError
from persona_em.io import read_table, stable_hash, write_table

log = logging.getLogger(__name__)

CELL_KEYS = ["model", "persona", "composition", "dataset", "seed"]
LABEL_NAMES = {MISALIGNED: "misaligned", ALIGNED: "aligned", UNLABELLED: "unlabelled"}


def random_directions(model: str, layer: int, hidden: int, n: int, seed: int) -> np.ndarray:
    """n Gaussian unit directions for one model and layer, the same in every job (a stable hash seeds them)."""
    rng = np.random.default_rng(int(stable_hash({"model": model, "layer": layer, "seed": seed}, 15), 16))
    return unit(rng.normal(size=(n, hidden)))


ROW_KEYS = [*CELL_KEYS, "step", "question_id", "sample_index", "response_id", "reader"]
PROJECTION_COLUMNS = [*ROW_KEYS, "direction", "layer", "fold", "projection", "label", "direction_norm"]


def projection_rows(x: np.ndarray, index: pd.DataFrame, layers: list[int], fold: str | None,
                    direction: np.ndarray | None, personas: dict, labels: dict, n_random: int,
                    seed: int) -> pd.DataFrame:
    """Projections of one cell's rows (x [rows, layers, hidden] of `index`'s rows) on its fold's misalignment
    direction (`direction` [layers, hidden]; None: not built, no such rows), on the persona vectors of its model
    (`personas`: name -> vectors [layers, hidden]) and on the random controls, at every layer."""
    model = index["model"].iloc[0]
    keys = index[ROW_KEYS].reset_index(drop=True)
    label = keys["response_id"].map(lambda r: LABEL_NAMES[labels.get(r, UNLABELLED)])
    frames = []
    for j, layer in enumerate(layers):
        vecs = {}
        norm = math.nan  # the random controls' norm: the direction's, when there is one
        if direction is not None:
            norm = float(np.linalg.norm(direction[j]))
            vecs["misalignment"] = (unit(direction[j]), norm)
        for name, v in sorted(personas.items()):
            vecs[f"persona:{name}"] = (unit(v[j]), float(np.linalg.norm(v[j])))
        for k, v in enumerate(random_directions(model, layer, x.shape[-1], n_random, seed)):
            vecs[f"random{k}"] = (v, norm)
        for name, (v, n) in vecs.items():
            frames.append(keys.assign(direction=name, layer=layer, fold=fold, projection=x[:, j] @ v, label=label,
                                      direction_norm=n))
    if not frames:  # no persona vector, no direction and n_random: 0
        return pd.DataFrame(columns=PROJECTION_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PROJECTION_COLUMNS]


SUMMARY_KEYS = ["model", "persona", "composition", "dataset", "step", "reader", "direction", "layer"]
SUMMARY_COLUMNS = [*SUMMARY_KEYS, "n_seeds", "n_responses", "mean_projection", "ci_low", "ci_high", "ci_method",
                   "n_misaligned", "n_aligned", "auroc", "auroc_status"]


def auroc_status(n_misaligned: int, n_aligned: int) -> str:
    """`computed` when both of the judge's classes are present, else why the AUROC is missing."""
    if n_misaligned and n_aligned:
        return "computed"
    if not n_misaligned and not n_aligned:
        return "no labelled response"
    return "no misaligned response" if not n_misaligned else "no aligned response"


def summary(proj: pd.DataFrame, n_bootstrap: int, seed: int) -> pd.DataFrame:
    rows = []
    for key, g in proj.groupby(SUMMARY_KEYS, sort=True):
        per_seed = g.groupby("seed")["projection"].mean()
        low, high = bootstrap_ci(per_seed.to_numpy(), n_bootstrap, seed) if len(per_seed) > 1 else (math.nan,
                                                                                                     math.nan)
        lab = g["label"].map({"misaligned": MISALIGNED, "aligned": ALIGNED}).fillna(UNLABELLED).to_numpy()
        n_mis, n_al = int((lab == MISALIGNED).sum()), int((lab == ALIGNED).sum())
        rows.append({**dict(zip(SUMMARY_KEYS, key)), "n_seeds": len(per_seed), "n_responses": len(g),
                     "mean_projection": float(per_seed.mean()), "ci_low": low, "ci_high": high,
                     "ci_method": f"bootstrap95_{n_bootstrap}_seed{seed} over seeds" if len(per_seed) > 1 else
                     "one seed: no interval",
                     "n_misaligned": n_mis, "n_aligned": n_al,
                     "auroc": auroc(g["projection"].to_numpy(), lab), "auroc_status": auroc_status(n_mis, n_al)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


PERSONA_ON = ("stacked", "merged", "posthoc")  # compositions whose step-0 model runs the persona


def persona_retention(cells: dict, vectors: dict, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """R(t) per persona vector, cell, step and layer (module docstring). `cells`: cell tuple -> (x, index) of the
    own reader's rows (x [rows, layers, hidden]); `vectors`: (model, persona) -> (vector.json, vectors [layers,
    hidden])."""
    def step_means(cell, u):
        x, index = cells[cell]
        proj = np.einsum("nld,ld->nl", x, u)
        steps = index["step"].to_numpy()
        return {int(t): proj[steps == t].mean(0) for t in sorted(set(steps.tolist()))}

    rows = []
    for (model, vec_persona), (info, vecs) in sorted(vectors.items()):
        u = unit(vecs)
        layers = info["layers"]
        per_seed: dict = {}
        for dataset, s in sorted({(c[3], c[4]) for c in cells if c[0] == model}):
            none = (model, NO_PERSONA, NO_PERSONA, dataset, s)
            own = [c for c in cells if c[:2] == (model, vec_persona) and c[3:] == (dataset, s)]
            refs = [c for c in own if c[2] in PERSONA_ON]
            if none not in cells or not refs:
                log.info("persona retention on %s/%s: no %s at %s seed %s", model, vec_persona,
                         "no-persona cell" if none not in cells else "persona-on cell (stacked, merged, posthoc)",
                         dataset, s)
                continue
            means = {c: step_means(c, u) for c in [none, *own]}
            p_none0 = means[none][0]
            p_pers0 = np.mean([means[c][0] for c in refs], 0)
            for c in [none, *own]:
                span = p_pers0 - p_none0
                span = np.where(span == 0, np.nan, span)  # no persona shift at a layer: R undefined there
                for t, p_t in means[c].items():
                    per_seed.setdefault((c[1], c[2], dataset, t), []).append(
                        ((p_t - p_none0) / span, p_t, p_pers0, p_none0))
        for (persona, composition, dataset, t), values in sorted(per_seed.items()):
            for j, layer in enumerate(layers):
                r = np.array([v[0][j] for v in values])
                low, high = bootstrap_ci(r, n_bootstrap, seed) if len(r) > 1 else (math.nan, math.nan)
                rows.append({"model": model, "persona_vector": vec_persona, "persona": persona,
                             "composition": composition, "dataset": dataset, "step": t, "layer": layer,
                             "chosen_layer": layer == info["chosen_layer"], "n_seeds": len(r),
                             "retention": float(r.mean()), "ci_low": low, "ci_high": high,
                             "ci_method": f"bootstrap95_{n_bootstrap}_seed{seed} over seeds" if len(r) > 1 else
                             "one seed: no interval",
                             "p_t": float(np.mean([v[1][j] for v in values])),
                             "p_persona_0": float(np.mean([v[2][j] for v in values])),
                             "p_none_0": float(np.mean([v[3][j] for v in values]))})
    return pd.DataFrame(rows, columns=RETENTION_COLUMNS)


RETENTION_COLUMNS = ["model", "persona_vector", "persona", "composition", "dataset", "step", "layer", "chosen_layer",
                     "n_seeds", "retention", "ci_low", "ci_high", "ci_method", "p_t", "p_persona_0", "p_none_0"]


def load_vectors(vector_dirs: list[str]) -> dict:
    """(model, persona) -> (vector.json, vectors) of persona_vectors outputs."""
    out = {}
    for d in vector_dirs:
        info, vecs = load_persona_vector(d)
        out[(info["model"], info["persona"])] = (info, vecs)
    return out


def persona_retention_table(activation_dirs: list[str], vector_dirs: list[str], settings: dict, n_bootstrap: int,
                            out_path: str) -> None:
    """The persona_retention table (rule persona_retention; no judge involved)."""
    vectors = load_vectors(vector_dirs)
    cells = {}
    for d in activation_dirs:
        tensors, index, meta = load_activations(d)
        own = (index["reader"] == OWN).to_numpy()
        for (model, persona), (info, _) in vectors.items():
            if model == meta["model"] and info["layers"] != meta["layers"]:
                raise UserError(f"{d}: layers {meta['layers']} differ from the persona vector {model}/{persona}'s "
                                f"{info['layers']}: rerun collect_activations and persona_vectors")
        cells[tuple(meta[k] for k in CELL_KEYS)] = (tensors[settings["kind"]][own].astype(np.float32),
                                                    index[own].reset_index(drop=True))
    write_table(out_path, persona_retention(cells, vectors, n_bootstrap, settings["seed"]))

def activation_projections(activation_dirs: list[str], direction_dirs: dict[str, str], vector_dirs: list[str],
                           scores_path: str, settings: dict, n_bootstrap: int, judge_key: str, outputs: dict) -> None:
    """The two tables of one judge (module docstring). `direction_dirs`: model -> misalignment_direction output
    (empty: no direction is built, analysis.activations.misalignment_direction off); `vector_dirs`: persona_vectors
    outputs; `outputs`: table name -> path."""
    labels = response_labels(read_table(scores_path))
    infos = {m: load_direction(d) for m, d in direction_dirs.items()}
    vectors = load_vectors(vector_dirs)
    frames = []
    for d in activation_dirs:
        tensors, index, meta = load_activations(d)
        layers = meta["layers"]
        x = tensors[settings["kind"]].astype(np.float32)
        personas = {p: v for (m, p), (i, v) in vectors.items() if m == meta["model"]}
        for name, (i, _) in ((p, vectors[meta["model"], p]) for p in personas):
            if i["layers"] != layers:
                raise UserError(f"{d}: layers {layers} differ from the persona vector {name}'s {i['layers']}")
        fold, direction = None, None
        if meta["model"] in infos:
            info, directions = infos[meta["model"]]
            if info["layers"] != layers:
                raise RuntimeError(f"{d}: layers {layers} differ from the direction's {info['layers']}")
            fold = str(meta[info["fold_by"]])
            direction = directions[info["folds"].index(fold)]
        frames.append(projection_rows(x, index, layers, fold, direction, personas, labels, settings["n_random"],
                                      settings["seed"]))
    proj = pd.concat(frames, ignore_index=True).assign(judge_key=judge_key)
    summ = summary(proj, n_bootstrap, settings["seed"])
    chosen = {m: i["chosen_layer"] for m, (i, _) in infos.items()}
    persona_chosen = {(m, f"persona:{p}"): i["chosen_layer"] for (m, p), (i, _) in vectors.items()}
    summ["chosen_layer"] = [layer == persona_chosen.get((m, d), chosen.get(m))
                            for m, d, layer in zip(summ["model"], summ["direction"], summ["layer"])]
    write_table(outputs["activation_projections"], proj)
    write_table(outputs["activation_summary"], summ.assign(judge_key=judge_key))
