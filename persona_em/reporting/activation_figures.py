"""Figures of the activation analysis (rule activation_figures), one function per figure, from its tables alone.
A figure with nothing to draw (no misalignment direction, no persona vector) says so and why; so does a panel (no
AUROC where the judge labelled no response of one class).

persona_projection_vs_step        activation_summary.tsv: own reader, each persona vector at its chosen layer, with
                                   the random controls of that layer; below, the AUROC of that projection against the
                                   judge's labels (needs no misalignment direction)
misalignment_projection_vs_step   activation_summary.tsv: own reader, misalignment direction, each model's chosen layer
direction_auroc_by_layer           the layers.tsv of every model's direction: held-out AUROC per layer
persona_retention_vs_step          persona_retention.tsv (judge-free) at each persona vector's chosen layer beside the
                                   judge's EM rate (em_rates.tsv) of the same cells: the headline (rule
                                   persona_retention_figure; needs no misalignment direction)
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd  # noqa: E402

from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from persona_em.activations.direction import THRESHOLDS  # noqa: E402
from persona_em.io import read_table, write_json  # noqa: E402
from persona_em.reporting.figures import _message_figure, save_figure  # noqa: E402

LABELS = f"misaligned: {THRESHOLDS['misaligned']}; aligned: {THRESHOLDS['aligned']}"


def _condition(frame: pd.DataFrame) -> pd.Series:
    return frame["persona"] + " (" + frame["composition"] + ")"


def _empty(title: str, message: str):
    """A figure that says there is nothing to draw, and why (persona_em/reporting/figures.py's pattern)."""
    return _message_figure(title, message), f"{title}: nothing to show. {message}"


def _label_counts(summary: pd.DataFrame) -> str:
    """How many of the responses the judge labelled misaligned and aligned (one direction and layer of the own
    reader's rows count every response once)."""
    own = summary[summary["reader"] == "own"]
    if own.empty:
        return "No projection."
    first = own[(own["direction"] == own["direction"].iloc[0]) & (own["layer"] == own["layer"].iloc[0])]
    return (f"The judge labelled {int(first['n_misaligned'].sum())} misaligned and {int(first['n_aligned'].sum())} "
            f"aligned of {int(first['n_responses'].sum())} responses ({LABELS}).")


def _no_direction(title: str, summary: pd.DataFrame):
    return _empty(title, "No misalignment direction: analysis.activations.misalignment_direction is false. It is "
                         "built from the judge's misaligned and aligned responses (at least min_per_class of each "
                         f"per fold); switch it on with a judge that labels them. {_label_counts(summary)}")


def persona_projection_vs_step(summary: pd.DataFrame):
    title = "Projection on the persona vectors vs EM training step"
    own = summary[summary["reader"] == "own"]
    sub = own[own["direction"].str.startswith("persona:") & own["chosen_layer"].astype(bool)]
    if sub.empty:
        return _empty(title, "No persona vector: the grid has no persona besides 'none' (a persona vector is built "
                             "per model and grid persona).")
    own = own.assign(condition=_condition(own))
    sub = sub.assign(condition=_condition(sub))
    panels = sorted(sub.groupby(["model", "dataset", "direction"]).groups)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.6), squeeze=False, sharex="col",
                             layout="constrained")
    n_random = 0
    for j, (model, dataset, direction) in enumerate(panels):
        top, bottom = axes[0][j], axes[1][j]
        p = sub[(sub["model"] == model) & (sub["dataset"] == dataset) & (sub["direction"] == direction)]
        layer = int(p["layer"].iloc[0])
        controls = own[(own["model"] == model) & (own["dataset"] == dataset) & (own["layer"] == layer)
                       & own["direction"].str.startswith("random")]
        n_random = max(n_random, controls["direction"].nunique())
        for cond, g in p.groupby("condition"):
            g = g.sort_values("step")
            line, = top.plot(g["step"], g["mean_projection"], marker="o", label=cond)
            top.fill_between(g["step"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
            for _, c in controls[controls["condition"] == cond].groupby("direction"):
                c = c.sort_values("step")
                top.plot(c["step"], c["mean_projection"], color=line.get_color(), ls=":", lw=0.8)
            a = g[g["auroc_status"] == "computed"]
            if len(a):
                bottom.plot(a["step"], a["auroc"], marker="o", color=line.get_color(), label=cond)
        if not bottom.lines:
            bottom.text(0.5, 0.5, "no AUROC: of these responses the judge\nlabelled "
                        f"{int(p['n_misaligned'].sum())} misaligned and {int(p['n_aligned'].sum())} aligned "
                        f"(of {int(p['n_responses'].sum())});\nit needs both classes at a step\n(auroc_status: "
                        "activation_summary.tsv)", ha="center", va="center", fontsize=8, transform=bottom.transAxes)
            bottom.set_yticks([])
        else:
            bottom.axhline(0.5, color="grey", lw=0.8, ls=":")
            bottom.set_ylim(0, 1)
        top.set_title(f"{model} / {dataset}\n{direction.split(':', 1)[1]} vector (layer {layer})", fontsize=9)
        top.set_ylabel("mean projection (own model)")
        bottom.set_ylabel("AUROC vs the judge's labels")
        bottom.set_xlabel("EM training step")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = top.get_legend_handles_labels()[0]
        if n_random:
            handles.append(Line2D([], [], color="grey", ls=":", lw=0.8, label="random directions (control)"))
        top.legend(handles=handles, fontsize=7)
    computed = int((sub["auroc_status"] == "computed").sum())
    where = ("at every point" if computed == len(sub) else
             "at no point: the judge labelled no response of one class or of both" if computed == 0 else
             f"at {computed} of {len(sub)} points; elsewhere the judge labelled no response of one class or of both")
    caption = (f"{title}, per model, dataset and persona vector. Top: the mean over seeds of each seed's mean "
               f"projection of its responses' activations (the model that wrote them) on the unit persona vector "
               f"(the base model's mean response activation with the persona's system prompt minus without), at the "
               f"vector's layer of highest held-out Cohen's d, one line per persona (composition); bands: bootstrap "
               f"95% CI over seeds (none with one seed); dotted, same colour: the same responses on {n_random} "
               f"random unit directions of that layer (the control). Bottom: AUROC of that projection against the "
               f"judge's labels ({LABELS}), responses of every seed, {where}. Responses per point: "
               f"{int(sub['n_responses'].min())}-{int(sub['n_responses'].max())}.")
    return fig, caption


def misalignment_projection_vs_step(summary: pd.DataFrame, has_direction: bool = True):
    title = "Projection on the misalignment direction vs EM training step"
    if not has_direction:
        return _no_direction(title, summary)
    sub = summary[(summary["direction"] == "misalignment") & (summary["reader"] == "own")
                  & summary["chosen_layer"].astype(bool)]
    if sub.empty:
        return _empty(title, "No projection on the misalignment direction.")
    sub = sub.assign(condition=_condition(sub))
    panels = sorted(sub.groupby(["model", "dataset"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], panels):
        p = sub[(sub["model"] == model) & (sub["dataset"] == dataset)]
        for cond, g in p.groupby("condition"):
            g = g.sort_values("step")
            line, = ax.plot(g["step"], g["mean_projection"], marker="o", label=cond)
            ax.fill_between(g["step"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(f"{model} / {dataset} (layer {int(p['layer'].iloc[0])})", fontsize=9)
        ax.set_xlabel("EM training step")
        ax.set_ylabel("mean projection (own model)")
        ax.legend(fontsize=7)
    caption = (f"{title}, per model and dataset, one line per persona (composition): the mean over seeds of each "
               f"seed's mean projection of its responses' activations (the model that wrote them) on the unit "
               f"misalignment direction, cross-fitted (a cell is projected on the direction built without its fold), "
               f"at the layer with the highest held-out AUROC; bands: bootstrap 95% CI over seeds (none with one "
               f"seed). Responses per point: {int(sub['n_responses'].min())}-{int(sub['n_responses'].max())}.")
    return fig, caption


def persona_retention_vs_step(retention: pd.DataFrame, em_rates: pd.DataFrame, em_definition: str):
    title = "Persona retention R(t) and EM rate vs EM training step"
    sub = retention[retention["chosen_layer"].astype(bool)] if len(retention) else retention
    if sub.empty:
        return _empty(title, "no persona cell with a no-persona cell of the same model, dataset and seed")
    sub = sub.assign(condition=_condition(sub))
    rates = em_rates[(em_rates["em_definition"] == em_definition) & (em_rates["question_id"] == "ALL")]
    rates = rates.groupby(["model", "persona", "composition", "dataset", "step"], as_index=False)["em_rate"].mean()
    panels = sorted(sub.groupby(["model", "dataset", "persona_vector"]).groups)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.6), squeeze=False, sharex="col")
    for j, (model, dataset, vector) in enumerate(panels):
        p = sub[(sub["model"] == model) & (sub["dataset"] == dataset) & (sub["persona_vector"] == vector)]
        for cond, g in p.groupby("condition"):
            g = g.sort_values("step")
            line, = axes[0][j].plot(g["step"], g["retention"], marker="o", label=cond)
            axes[0][j].fill_between(g["step"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
            r = rates.merge(g[["model", "persona", "composition", "dataset"]].drop_duplicates()).sort_values("step")
            axes[1][j].plot(r["step"], 100 * r["em_rate"], marker="o", color=line.get_color(), label=cond)
        if not axes[1][j].lines or all(np.isnan(np.asarray(ln.get_ydata(), float)).all() for ln in axes[1][j].lines):
            axes[1][j].text(0.5, 0.5, "no EM rate: the judge scored\nnone of these cells' responses\n(status counts: summary.tsv)",
                            ha="center", va="center", fontsize=8, transform=axes[1][j].transAxes)
            axes[1][j].set_yticks([])
        axes[0][j].axhline(1, color="grey", lw=0.8, ls=":")
        axes[0][j].axhline(0, color="grey", lw=0.8, ls=":")
        axes[0][j].set_title(f"{model} / {dataset}\n{vector} vector (layer {int(p['layer'].iloc[0])})", fontsize=9)
        axes[0][j].set_ylabel("persona retention R(t)")
        axes[1][j].set_ylabel(f"EM rate, % ({em_definition})")
        axes[1][j].set_xlabel("EM training step")
        axes[0][j].legend(fontsize=7)
    caption = (f"{title}, per model, dataset and persona vector. Top: R(t) = (p_t - p_none,0) / (p_persona,0 - "
               f"p_none,0), p = mean projection of each cell's own activations (the model that wrote its responses) "
               f"on the unit persona vector (the base model's mean response activation with the persona's system "
               f"prompt minus without, on the extract half of the persona's questions), p_none,0 = the no-persona "
               f"cell at step 0, p_persona,0 = the persona's cells at step 0; 1 = persona intact, 0 = back to the "
               f"no-persona baseline; mean over seeds, band: bootstrap 95% CI over seeds. Layer: the persona "
               f"vector's highest held-out Cohen's d. Bottom: the EM rate ({em_definition}) of the same cells, mean "
               f"over seeds.")
    return fig, caption


def direction_auroc_by_layer(layers: pd.DataFrame, summary: pd.DataFrame):
    title = "Held-out AUROC of the misalignment direction per layer"
    if layers.empty:
        return _no_direction(title, summary)
    pooled = layers[layers["fold"].astype(str) == "pooled"]
    if pooled.empty:
        return _empty(title, "No pooled held-out AUROC in the direction's layers.tsv.")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for model, g in pooled.groupby("model"):
        g = g.sort_values("layer")
        line, = ax.plot(g["layer"], g["auroc_heldout"], marker="o", label=model)
        best = g.loc[g["auroc_heldout"].idxmax()]
        ax.plot([best["layer"]], [best["auroc_heldout"]], marker="*", ms=14, color=line.get_color())
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("layer (hidden-state index; 0 = embeddings)")
    ax.set_ylabel("held-out AUROC")
    ax.legend(fontsize=7)
    caption = (f"{title}: each fold's held-out responses (misaligned: aligned <= 30 and coherent > 50; aligned: "
               f"aligned > 70) projected on the direction built without the fold, pooled over folds; star: the "
               f"chosen layer. Folds: {', '.join(sorted(set(pooled['fold_by'])))}.")
    return fig, caption


def _save(name: str, plot, args, inputs: list[str], outputs: dict) -> None:
    paths = {kind: outputs[f"{name}_{kind}"] for kind in ("png", "svg", "caption")}
    fig, caption = plot(*args)
    save_figure(fig, paths, caption)
    write_json(outputs[f"{name}_provenance"], {"figure": name, "files": list(paths.values()), "inputs": inputs,
                                               "caption": caption})


def make_activation_figures(summary_path: str, direction_dirs: list[str], outputs: dict) -> None:
    """The figures of activation_summary.tsv and of the misalignment directions (`direction_dirs`: none when
    analysis.activations.misalignment_direction is off; those figures then say so); `outputs` maps
    '<name>_<png|svg|caption|provenance>' to a path."""
    summary = read_table(summary_path)
    layers = (pd.concat([read_table(f"{d}/layers.tsv") for d in direction_dirs], ignore_index=True) if direction_dirs
              else pd.DataFrame())
    inputs = [summary_path, *direction_dirs]
    _save("persona_projection_vs_step", persona_projection_vs_step, (summary,), inputs, outputs)
    _save("misalignment_projection_vs_step", misalignment_projection_vs_step, (summary, bool(direction_dirs)),
          inputs, outputs)
    _save("direction_auroc_by_layer", direction_auroc_by_layer, (layers, summary), inputs, outputs)


def make_retention_figure(retention_path: str, em_rates_path: str, em_definition: str, outputs: dict) -> None:
    """persona_retention_vs_step; `outputs` as above."""
    _save("persona_retention_vs_step", persona_retention_vs_step,
          (read_table(retention_path), read_table(em_rates_path), em_definition), [retention_path, em_rates_path],
          outputs)
