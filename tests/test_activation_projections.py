"""Projections, summaries and persona retention from synthetic stored activations: values equal dot(activation,
unit direction) recomputed here, every cell is projected on the direction of the fold that excludes its seed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from persona_em.activations import collect, store
from persona_em.activations import direction as D
from persona_em.activations.projections import activation_projections, random_directions
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
    return dirs, offset


def test_projection_values_and_cross_fitting(tmp_path):
    dirs, offset = world(tmp_path)
    D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), SETTINGS, "j-1", "m", str(tmp_path / "dir"))
    info, directions = D.load_direction(tmp_path / "dir")
    assert info["fold_by"] == "seed" and info["folds"] == ["0", "1"]
    outputs = {n: str(tmp_path / f"{n}.tsv") for n in ("activation_projections", "activation_summary",
                                                       "persona_retention")}
    activation_projections(dirs, {"m": str(tmp_path / "dir")}, str(tmp_path / "scores.tsv"),
                           str(tmp_path / "em_rates.tsv"), SETTINGS, "betley", 200, "j-1", outputs)
    proj = read_table(outputs["activation_projections"])
    assert set(proj["direction"]) == {"misalignment", "random0", "random1"}
    checked = 0
    for d in dirs:
        tensors, index, meta = store.load_activations(d)
        x = tensors["response_mean"].astype(np.float32)
        rows = proj[proj["response_id"].isin(index["response_id"])]
        assert set(rows["fold"].astype(str)) == {str(meta["seed"])}  # its own seed's fold: built without it
        for j, layer in enumerate(LAYERS):
            want_dirs = {"misalignment": directions[info["folds"].index(str(meta["seed"])), j]}
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
    ret = read_table(outputs["persona_retention"])
    at0, at4 = ret[ret["step"] == 0], ret[ret["step"] == 4]
    np.testing.assert_allclose(at0["retention"], 1.0, atol=1e-6)  # by definition
    assert ((at4["retention"] > 0.3) & (at4["retention"] < 0.7)).all()  # the planted shift halves at step 4
    assert set(at4["em_rate"]) == {0.5}


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
    from persona_em.activations.projections import activation_projections as run_projections
    from persona_em.reporting.activation_figures import make_activation_figures
    from persona_em.artifacts import ACTIVATION_FIGURES, FIGURE_SUFFIXES

    dirs, _ = world(tmp_path)
    D.misalignment_direction(dirs, str(tmp_path / "scores.tsv"), SETTINGS, "j-1", "m", str(tmp_path / "dir"))
    tables = {n: str(tmp_path / f"{n}.tsv") for n in ("activation_projections", "activation_summary",
                                                      "persona_retention")}
    run_projections(dirs, {"m": str(tmp_path / "dir")}, str(tmp_path / "scores.tsv"), str(tmp_path / "em_rates.tsv"),
                    SETTINGS, "betley", 100, "j-1", tables)
    outputs = {f"{n}_{k}": str(tmp_path / "fig" / f"{n}.{s}") for n in ACTIVATION_FIGURES
               for k, s in FIGURE_SUFFIXES.items()}
    make_activation_figures(tables["activation_summary"], tables["persona_retention"], [str(tmp_path / "dir")],
                            outputs)
    for path in outputs.values():
        assert (tmp_path / "fig" / path.rsplit("/", 1)[1]).stat().st_size > 0
