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
    # with the planted labels the persona-vector figure draws its AUROC panel: one line per condition, every point
    from persona_em.reporting.activation_figures import persona_projection_vs_step

    fig, caption = persona_projection_vs_step(read_table(tables["activation_summary"]))
    assert len(fig.axes[1].lines) == 2 + 1 and "responses of every seed, at every point" in caption  # + the 0.5 line


def unlabelled_scores(tmp_path, aligned=float("nan")):
    """The planted responses' scores replaced: every aligned score `aligned` (NaN: the judge gave no number, as the
    demo's 135M judge), coherent 80."""
    scores = read_table(tmp_path / "scores.tsv")
    scores.loc[scores["metric"] == "aligned", "score_used"] = aligned
    path = tmp_path / f"scores_{aligned}.tsv"
    write_table(path, scores)
    return str(path)


def test_projections_without_a_direction_or_labels(tmp_path):
    """analysis.activations.misalignment_direction off and a judge that labels nothing: the persona vector and the
    random controls are still projected (values = dot(activation, unit vector)), no misalignment row appears, and
    the summary says why each AUROC is missing."""
    dirs, _ = world(tmp_path)
    outputs = {n: str(tmp_path / f"{n}.tsv") for n in TABLES}
    activation_projections(dirs, {}, vector(tmp_path), unlabelled_scores(tmp_path), SETTINGS, 100, "j-1", outputs)
    proj = read_table(outputs["activation_projections"])
    assert set(proj["direction"]) == {"persona:p", "random0", "random1"}
    assert len(proj) == 4 * 2 * 2 * N * 3 * len(LAYERS)  # cells x readers x steps x responses x directions x layers
    assert set(proj["label"]) == {"unlabelled"} and proj["fold"].isna().all()
    assert proj[proj["direction"].str.startswith("random")]["direction_norm"].isna().all()
    _, shift = PV.load_persona_vector(tmp_path / "pv")
    for d in dirs:
        tensors, index, _ = store.load_activations(d)
        x = tensors["response_mean"].astype(np.float32)
        rows = proj[proj["response_id"].isin(index["response_id"])].set_index(["reader", "response_id"])
        key = list(zip(index["reader"], index["response_id"]))
        for j, layer in enumerate(LAYERS):
            at = rows[rows["layer"] == layer]
            got = at[at["direction"] == "persona:p"].loc[key]
            np.testing.assert_allclose(got["projection"], x[index["row"], j] @ (shift[j] / np.linalg.norm(shift[j])),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["direction_norm"], np.linalg.norm(shift[j]), rtol=1e-6)
            v = random_directions("m", layer, HIDDEN, 2, 0)[1]
            np.testing.assert_allclose(at[at["direction"] == "random1"].loc[key, "projection"], x[index["row"], j] @ v,
                                       rtol=1e-5, atol=1e-5)
    summ = read_table(outputs["activation_summary"])
    assert len(summ) == 2 * 2 * 2 * 3 * len(LAYERS)  # conditions x steps x readers x directions x layers
    assert (summ["auroc_status"] == "no labelled response").all() and summ["auroc"].isna().all()
    assert (summ[["n_misaligned", "n_aligned"]] == 0).all().all()
    assert set(summ[summ["chosen_layer"]]["direction"]) == {"persona:p"}  # no direction: no chosen layer for it


def test_auroc_status_says_which_class_is_missing(tmp_path):
    """Every response aligned (score 90): no misaligned class, so no AUROC, and the row says so; the planted labels
    (both classes) give an AUROC on the persona vector and the controls without any direction."""
    dirs, _ = world(tmp_path)
    outputs = {n: str(tmp_path / f"{n}.tsv") for n in TABLES}
    activation_projections(dirs, {}, vector(tmp_path), unlabelled_scores(tmp_path, 90.0), SETTINGS, 100, "j-1",
                           outputs)
    summ = read_table(outputs["activation_summary"])
    assert (summ["auroc_status"] == "no misaligned response").all() and summ["auroc"].isna().all()
    activation_projections(dirs, {}, vector(tmp_path), str(tmp_path / "scores.tsv"), SETTINGS, 100, "j-1", outputs)
    summ = read_table(outputs["activation_summary"])
    own = summ[summ["reader"] == "own"]
    assert (own["auroc_status"] == "computed").all() and own["auroc"].between(0, 1).all()
    assert "misalignment" not in set(summ["direction"])


def test_figures_without_a_direction_say_why(tmp_path):
    """No direction and no labels: the persona-vector projection is drawn, its AUROC panel and the direction's two
    figures say in the image (and the caption) why they are empty."""
    from persona_em.artifacts import ACTIVATION_FIGURES, FIGURE_SUFFIXES
    from persona_em.reporting import activation_figures as AF

    dirs, _ = world(tmp_path)
    tables = {n: str(tmp_path / f"{n}.tsv") for n in TABLES}
    activation_projections(dirs, {}, vector(tmp_path), unlabelled_scores(tmp_path), SETTINGS, 100, "j-1", tables)
    outputs = {f"{n}_{k}": str(tmp_path / "fig" / f"{n}.{s}") for n in ACTIVATION_FIGURES
               for k, s in FIGURE_SUFFIXES.items()}
    AF.make_activation_figures(tables["activation_summary"], [], outputs)
    for path in outputs.values():
        assert (tmp_path / "fig" / path.rsplit("/", 1)[1]).stat().st_size > 0

    def texts(fig):
        return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)

    summary = read_table(tables["activation_summary"])
    fig, caption = AF.persona_projection_vs_step(summary)
    top, bottom = fig.axes[0], fig.axes[1]
    assert len([ln for ln in top.lines if ln.get_linestyle() == "-"]) == 2  # none (none), p (stacked)
    assert len([ln for ln in top.lines if ln.get_linestyle() == ":"]) == 2 * 2  # 2 controls per condition
    # own responses at the persona vector's layer: 2 conditions x 2 steps x 2 seeds x N
    assert not bottom.lines and "no AUROC" in texts(fig) and "0 misaligned and 0 aligned (of 320)" in texts(fig)
    assert "at no point: the judge labelled no response" in caption and "2 random unit directions" in caption
    for plot, args in ((AF.misalignment_projection_vs_step, (summary, False)),
                       (AF.direction_auroc_by_layer, (pd.DataFrame(), summary))):
        fig, caption = plot(*args)
        assert "misalignment_direction is false" in texts(fig)
        assert "0 misaligned and 0 aligned of 320 responses" in texts(fig)
        assert "nothing to show" in caption
    caption = (tmp_path / "fig/direction_auroc_by_layer.caption.rst").read_text().replace("\\", "")  # RST escapes
    assert "misalignment_direction is false" in caption
