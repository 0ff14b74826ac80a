"""Projections, summaries and persona retention from synthetic stored activations: values equal dot(activation,
unit direction) recomputed here, every cell is projected on the direction of the fold that excludes its seed, and
persona retention on a planted persona vector is 1 for the persona cell and 0 for the no-persona cell at step 0."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from persona_em.activations import collect, store
from persona_em.activations import direction as D
from persona_em.activations import persona_vectors as PV
from persona_em.activations.projections import activation_projections, persona_retention_table, random_directions
from persona_em.config import Cell
from persona_em.errors import UserError
from persona_em.io import read_table, write_table

LAYERS, HIDDEN, N = [0, 2], 16, 40
SETTINGS = {"kind": "response_mean", "min_per_class": 5, "n_random": 2, "seed": 0}


def world(tmp_path, seeds=(0, 1)):
    rng = np.random.default_rng(0)
    offset = rng.normal(size=HIDDEN) * 3
    shift = rng.normal(size=HIDDEN) * 2  # the persona's shift
    dirs, scores, rates = [], [], []
    for persona, comp in (("none", "none"), ("p", "stacked")):
        for seed in seeds:
            cell = Cell("m", persona, comp, "d", seed)
            index, parts = [], {k: [] for k in collect.KINDS}
            for reader in collect.READERS:
                for step in (0, 4):
                    x = rng.normal(size=(N, len(LAYERS), HIDDEN))
                    mis = np.arange(N) < (N // 4 if step == 0 else N // 2)
                    x[mis] += offset
                    if persona == "p":
                        x += shift * (1.0 if step == 0 else 0.5)
                    for k in collect.KINDS:
                        parts[k].append(torch.tensor(x, dtype=torch.float16))
                    for i in range(N):
                        rid = f"{cell.path}|step{step}|q|{i}"
                        index.append({**cell.keys(), "step": step, "question_id": "q", "paraphrase_index": 0,
                                      "sample_index": i, "response_id": rid, "reader": reader, "row": len(index),
                                      "n_prompt_tokens": 5, "n_response_tokens": 7, "active_adapters": "",
                                      "merged_persona": ""})
                        if reader == collect.OWN:
                            a = 10.0 if mis[i] else 90.0
                            scores += [{"response_id": rid, "metric": "aligned", "score_used": a},
                                       {"response_id": rid, "metric": "coherent", "score_used": 80.0}]
                    if reader == collect.OWN:
                        rates.append({**cell.keys(), "step": step, "question_id": "ALL", "em_definition": "betley",
                                      "em_rate": mis.mean()})
            out = tmp_path / "act" / cell.path
            collect.write_outputs(str(out), cell, LAYERS, parts, index, "fp")
            dirs.append(str(out))
    write_table(tmp_path / "scores.tsv", pd.DataFrame(scores))
    write_table(tmp_path / "em_rates.tsv", pd.DataFrame(rates))
    # the persona vector of p: the planted shift at every layer (its chosen layer: 2)
    PV.write_vector(tmp_path / "pv", {"model": "m", "persona": "p", "layers": LAYERS, "chosen_layer": 2},
                    np.stack([shift, shift]), [], [])
    return dirs, offset


def vector(tmp_path):
    return [str(tmp_path / "pv")]


TABLES = ("activation_projections", "activation_summary")


def test_projection_values_and_cross_fitting(tmp_path):
    dirs, offset = world(tmp_path)
    D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), SETTINGS, "j-1", "m", str(tmp_path / "dir"))
    info, directions = D.load_direction(tmp_path / "dir")
    assert info["fold_by"] == "seed" and info["folds"] == ["0", "1"]
    outputs = {n: str(tmp_path / f"{n}.tsv") for n in TABLES}
    activation_projections(dirs, {"m": str(tmp_path / "dir")}, vector(tmp_path), str(tmp_path / "scores.tsv"),
                           SETTINGS, 200, "j-1", outputs)
    proj = read_table(outputs["activation_projections"])
    assert set(proj["direction"]) == {"misalignment", "persona:p", "random0", "random1"}
    _, shift = PV.load_persona_vector(tmp_path / "pv")
    checked = 0
    for d in dirs:
        tensors, index, meta = store.load_activations(d)
        x = tensors["response_mean"].astype(np.float32)
        rows = proj[proj["response_id"].isin(index["response_id"])]
        assert set(rows["fold"].astype(str)) == {str(meta["seed"])}  # its own seed's fold: built without it
        for j, layer in enumerate(LAYERS):
            want_dirs = {"misalignment": directions[info["folds"].index(str(meta["seed"])), j],
                         "persona:p": shift[j]}
            for k, v in enumerate(random_directions("m", layer, HIDDEN, 2, 0)):
                want_dirs[f"random{k}"] = v
            for name, v in want_dirs.items():
                u = v / np.linalg.norm(v)
                got = rows[(rows["direction"] == name) & (rows["layer"] == layer)].sort_values(["reader", "step",
                                                                                                 "sample_index"])
                idx = index.set_index(["reader", "step", "sample_index"]).loc[
                    list(zip(got["reader"], got["step"], got["sample_index"]))]["row"].to_numpy()
                np.testing.assert_allclose(got["projection"].to_numpy(), x[idx, j] @ u, rtol=1e-5, atol=1e-5)
                checked += len(got)
    assert checked == len(proj)
    # fold 0's direction is the balanced mean difference of seed 1's responses only: close to the planted offset
    for f in range(2):
        cos = directions[f, 0] @ offset / np.linalg.norm(directions[f, 0]) / np.linalg.norm(offset)
        assert cos > 0.9
    summ = read_table(outputs["activation_summary"])
    mis = summ[(summ["direction"] == "misalignment") & (summ["reader"] == "own")]
    assert (mis["auroc"] > 0.95).all() and (mis["n_seeds"] == 2).all()
    assert len(summ[summ["direction"] == "random0"]) == len(mis) * 2  # both readers
    chosen = summ[summ["chosen_layer"]]
    assert set(chosen[chosen["direction"] == "persona:p"]["layer"]) == {2}  # the persona vector's own choice


def test_persona_retention_on_the_planted_persona_vector(tmp_path):
    """No judge and no misalignment direction needed: R(0) = 1 for the persona cell, 0 for the no-persona cell,
    and the planted shift halved at step 4 gives R(4) = 0.5 (plus, in both cells, the planted misalignment offset's
    growth along the persona vector)."""
    dirs, offset = world(tmp_path)
    _, vecs = PV.load_persona_vector(tmp_path / "pv")
    norm = np.linalg.norm(vecs[0])
    drift = (1 / 2 - 1 / 4) * offset @ vecs[0] / norm / norm  # the misaligned share grows from 1/4 to 1/2
    out = tmp_path / "persona_retention.tsv"
    persona_retention_table(dirs, vector(tmp_path), SETTINGS, 200, str(out))
    ret = read_table(out)
    assert set(ret["persona_vector"]) == {"p"} and set(ret["layer"]) == set(LAYERS)
    assert (ret["n_seeds"] == 2).all() and set(ret[ret["chosen_layer"]]["layer"]) == {2}
    pers, none = ret[ret["persona"] == "p"], ret[ret["persona"] == "none"]
    assert set(none["composition"]) == {"none"} and len(pers) == len(none) == 2 * len(LAYERS)
    np.testing.assert_allclose(pers[pers["step"] == 0]["retention"], 1.0, atol=1e-6)
    np.testing.assert_allclose(none[none["step"] == 0]["retention"], 0.0, atol=1e-6)
    np.testing.assert_allclose(pers[pers["step"] == 4]["retention"], 0.5 + drift, atol=0.1)  # noise: 40 responses a cell
    np.testing.assert_allclose(none[none["step"] == 4]["retention"], drift, atol=0.1)
    assert abs(drift) < 0.3


def test_persona_retention_refuses_layers_that_differ(tmp_path):
    dirs, _ = world(tmp_path)
    PV.write_vector(tmp_path / "pv2", {"model": "m", "persona": "p", "layers": [0, 1], "chosen_layer": 1},
                    np.zeros((2, HIDDEN)), [], [])
    with pytest.raises(UserError, match="layers .* differ from the persona vector m/p"):
        persona_retention_table(dirs, [str(tmp_path / "pv2")], SETTINGS, 200, str(tmp_path / "r.tsv"))
    assert not (tmp_path / "r.tsv").exists()


def test_one_seed_one_dataset_refuses_without_output(tmp_path):
    dirs, _ = world(tmp_path, seeds=(0,))
    with pytest.raises(UserError, match="two or more grid seeds"):
        D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), SETTINGS, "j-1", "m", str(tmp_path / "dir"))
    assert not (tmp_path / "dir").exists()


def test_too_few_misaligned_refuses_without_output(tmp_path):
    dirs, _ = world(tmp_path)
    with pytest.raises(UserError, match=r"misaligned .* at least 500 of each"):
        D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), {**SETTINGS, "min_per_class": 500}, "j-1", "m",
                                 str(tmp_path / "dir"))
    assert not (tmp_path / "dir").exists()


def test_figures_are_drawn_from_the_tables(tmp_path):
    from persona_em.reporting.activation_figures import make_activation_figures, make_retention_figure
    from persona_em.artifacts import ACTIVATION_FIGURES, FIGURE_SUFFIXES, RETENTION_FIGURES

    dirs, _ = world(tmp_path)
    D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), SETTINGS, "j-1", "m", str(tmp_path / "dir"))
    tables = {n: str(tmp_path / f"{n}.tsv") for n in TABLES}
    activation_projections(dirs, {"m": str(tmp_path / "dir")}, vector(tmp_path), str(tmp_path / "scores.tsv"),
                           SETTINGS, 100, "j-1", tables)
    persona_retention_table(dirs, vector(tmp_path), SETTINGS, 100, str(tmp_path / "persona_retention.tsv"))
    outputs = {f"{n}_{k}": str(tmp_path / "fig" / f"{n}.{s}") for n in [*ACTIVATION_FIGURES, *RETENTION_FIGURES]
               for k, s in FIGURE_SUFFIXES.items()}
    make_activation_figures(tables["activation_summary"], [str(tmp_path / "dir")], outputs)
    make_retention_figure(str(tmp_path / "persona_retention.tsv"), str(tmp_path / "em_rates.tsv"), "betley", outputs)
    for path in outputs.values():
        assert (tmp_path / "fig" / path.rsplit("/", 1)[1]).stat().st_size > 0
    caption = (tmp_path / "fig" / "persona_retention_vs_step.caption.rst").read_text()
    assert "persona vector" in caption and "Cohen" in caption
