"""Figures of the activation analysis (rule activation_figures), one function per figure, from its tables alone.

misalignment_projection_vs_step   activation_summary.tsv: own reader, misalignment direction, each model's chosen layer
persona_retention_vs_step          persona_retention.tsv at the chosen layer: R(t) beside the EM rate (the headline)
direction_auroc_by_layer           the layers.tsv of every model's direction: held-out AUROC per layer
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from persona_em.io import read_table, write_json  # noqa: E402
from persona_em.reporting.figures import save_figure  # noqa: E402


def _condition(frame: pd.DataFrame) -> pd.Series:
    return frame["persona"] + " (" + frame["composition"] + ")"


def _empty(title: str, message: str):
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig, f"{title}: {message}"


def misalignment_projection_vs_step(summary: pd.DataFrame):
    title = "Projection on the misalignment direction vs EM training step"
    sub = summary[(summary["direction"] == "misalignment") & (summary["reader"] == "own") & summary["chosen_layer"]]
    if sub.empty:
        return _empty(title, "no projections")
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


def persona_retention_vs_step(retention: pd.DataFrame):
    title = "Persona retention R(t) and EM rate vs EM training step"
    sub = retention[retention["chosen_layer"]] if len(retention) else retention
    if sub.empty:
        return _empty(title, "no persona cell with a no-persona cell of the same model, dataset and seed")
    sub = sub.assign(condition=_condition(sub))
    panels = sorted(sub.groupby(["model", "dataset"]).groups)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.6), squeeze=False, sharex="col")
    for j, (model, dataset) in enumerate(panels):
        p = sub[(sub["model"] == model) & (sub["dataset"] == dataset)]
        for cond, g in p.groupby("condition"):
            g = g.sort_values("step")
            line, = axes[0][j].plot(g["step"], g["retention"], marker="o", label=cond)
            axes[0][j].fill_between(g["step"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
            axes[1][j].plot(g["step"], 100 * g["em_rate"], marker="o", color=line.get_color(), label=cond)
        axes[0][j].axhline(1, color="grey", lw=0.8, ls=":")
        axes[0][j].axhline(0, color="grey", lw=0.8, ls=":")
        axes[0][j].set_title(f"{model} / {dataset} (layer {int(p['layer'].iloc[0])})", fontsize=9)
        axes[0][j].set_ylabel("persona retention R(t)")
        axes[1][j].set_ylabel(f"EM rate, % ({p['em_definition'].iloc[0]})")
        axes[1][j].set_xlabel("EM training step")
        axes[0][j].legend(fontsize=7)
    caption = (f"{title}. Top: R(t) = (p_t - p_none,0) / (p_persona,0 - p_none,0), p = mean projection of the "
               f"persona model's own activations on the persona's direction (the base model's mean activation over "
               f"the persona cell's step-0 responses minus over the no-persona cell's), 1 = persona intact, 0 = back "
               f"to the no-persona baseline; mean over seeds, band: bootstrap 95% CI over seeds. Bottom: the EM rate "
               f"of the same cells, mean over seeds. Layer: the misalignment direction's chosen layer.")
    return fig, caption


def direction_auroc_by_layer(layers: pd.DataFrame):
    title = "Held-out AUROC of the misalignment direction per layer"
    pooled = layers[layers["fold"].astype(str) == "pooled"]
    if pooled.empty:
        return _empty(title, "no direction")
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


def make_activation_figures(summary_path: str, retention_path: str, direction_dirs: list[str],
                            outputs: dict) -> None:
    """Every activation figure; `outputs` maps '<name>_<png|svg|caption|provenance>' to a path."""
    layers = pd.concat([read_table(f"{d}/layers.tsv") for d in direction_dirs], ignore_index=True)
    plots = {"misalignment_projection_vs_step": (misalignment_projection_vs_step, read_table(summary_path)),
             "persona_retention_vs_step": (persona_retention_vs_step, read_table(retention_path)),
             "direction_auroc_by_layer": (direction_auroc_by_layer, layers)}
    inputs = [summary_path, retention_path, *direction_dirs]
    for name, (plot, frame) in plots.items():
        paths = {kind: outputs[f"{name}_{kind}"] for kind in ("png", "svg", "caption")}
        fig, caption = plot(frame)
        save_figure(fig, paths, caption)
        write_json(outputs[f"{name}_provenance"], {"figure": name, "files": list(paths.values()), "inputs": inputs,
                                                   "caption": caption})
