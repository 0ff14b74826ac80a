"""Figures of the weight trajectories (tables weight_norms and weight_rotation of every cell, rule weight_norms),
drawn per judge by rule plot_figures beside persona_em/reporting/figures.py's: the EM rate on the rotation figure's
second axis is that judge's.

weight_norms_vs_step     ||EM update||_F per layer group (√Σ over the group's modules of em_norm²) vs step, mean over
                         seeds, one line per persona (composition); dashed: the model's total update (persona + EM,
                         with the cross term) where a persona is in the model
weight_rotation_vs_step  angle between consecutive EM updates of the whole adapter (from the kept inner products:
                         weights.group_cosine) vs step; dotted: the B-vector angle of rank-1 adapters; on a second
                         axis the judge's EM rate (figure's EM definition, all questions, mean over seeds)
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from persona_em import provenance
from persona_em.analysis import tables
from persona_em.analysis.metrics import get_definition
from persona_em.analysis.weights import group_cosine
from persona_em.artifacts import WEIGHT_FIGURES
from persona_em.config import NO_PERSONA
from persona_em.io import read_table
from persona_em.reporting.figures import _grid, _message_figure, _style, save_figure

CELL = ["model", "persona", "composition", "dataset", "seed"]
GROUPS = 3  # layer groups: early, middle, late thirds of the adapted layers' range


def _read(paths: list[str]) -> pd.DataFrame:
    frames = [f for f in (read_table(p) for p in paths) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def layer_group(frame: pd.DataFrame) -> pd.Series:
    """'layers a-b' per row: thirds of each model's layer range (one group per layer when fewer than 3 are adapted);
    'other' for modules outside the layer stack (layer -1)."""
    out = pd.Series("other", index=frame.index, dtype=object)
    for model, g in frame[frame["layer"] >= 0].groupby("model"):
        layers = sorted(g["layer"].unique())
        if len(layers) < GROUPS:
            out[g.index] = g["layer"].map(lambda layer: f"layer {layer}")
            continue
        top = max(layers) + 1
        edges = [round(top * k / GROUPS) for k in range(GROUPS + 1)]
        out[g.index] = g["layer"].map(lambda layer: next(f"layers {edges[k]}-{edges[k + 1] - 1}"
                                                          for k in range(GROUPS) if layer < edges[k + 1]))
    return out


def _conditions(frame: pd.DataFrame) -> tuple[list[str], dict]:
    import seaborn as sns

    labels = sorted(set(tables.condition_label(frame)), key=lambda c: (c != NO_PERSONA, c))
    return labels, dict(zip(labels, sns.color_palette("colorblind", max(len(labels), 1))))


def weight_norms_vs_step(norms: pd.DataFrame, rates: pd.DataFrame, judge: dict):
    title = "EM update norm vs EM training step, per layer group"
    if norms.empty:
        return _message_figure(title, "No weight table has a row."), f"{title}: nothing to show (no weight rows)."
    norms = norms.assign(group=layer_group(norms), condition=tables.condition_label(norms))
    norms["em_sq"], norms["total_sq"] = norms["em_norm"] ** 2, norms["total_norm"] ** 2
    per_cell = norms.groupby(CELL + ["condition", "group", "step"], as_index=False)[["em_sq", "total_sq"]].sum()
    per_cell["em"], per_cell["total"] = np.sqrt(per_cell["em_sq"]), np.sqrt(per_cell["total_sq"])
    curves = per_cell.groupby(["model", "dataset", "condition", "group", "step"], as_index=False).agg(
        em=("em", "mean"), total=("total", "mean"), n_seeds=("seed", "nunique"))
    panels = sorted(curves[["model", "dataset"]].drop_duplicates().itertuples(index=False))
    groups = sorted(curves["group"].unique(), key=lambda g: (g == "other", int(g.split()[-1].split("-")[0])
                                                             if g != "other" else 0))
    conditions, palette = _conditions(norms)
    fig, axes = _grid(len(panels), len(groups), title)
    for i, (model, dataset) in enumerate(panels):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            sub = curves[(curves["model"] == model) & (curves["dataset"] == dataset) & (curves["group"] == group)]
            for cond, g in sub.groupby("condition"):
                g = g.sort_values("step")
                ax.plot(g["step"], g["em"], marker="o", ms=3, color=palette[cond])
                if (g["total"] - g["em"]).abs().max() > 0:
                    ax.plot(g["step"], g["total"], ls="--", color=palette[cond])
            ax.set_title(f"{model} · {dataset} · {group}")
            ax.set_xlabel("EM training step")
            ax.set_ylabel("Frobenius norm")
    handles = [Line2D([], [], color=palette[c], label=c) for c in conditions]
    handles += [Line2D([], [], color="black", label="EM update s·B·A"),
                Line2D([], [], color="black", ls="--", label="persona + EM (total)")]
    fig.legend(handles=handles, loc="outside right center", title="persona (composition)", frameon=False)
    seeds = int(curves["n_seeds"].max())
    caption = (f"{title}: per layer group the norm of the concatenated EM LoRA updates s·B·A (√ of the sum of the "
               f"modules' squared Frobenius norms, from r×r Gram products), mean over up to {seeds} seed(s); dashed: "
               f"the norm of the update the cell's model applies (persona + EM, cross term included) where the "
               f"persona is in the model (stacked, merged). Step 0 is the model before EM training (EM norm 0). "
               f"Weight tables are judge-independent; judge {provenance.judge_text(judge)}.")
    return fig, caption


def _adapter_angles(rotation: pd.DataFrame) -> pd.DataFrame:
    """Per cell and step: the whole EM adapter's angle to the previous snapshot and the mean B-vector angle."""
    rows = []
    for key, g in rotation.groupby(CELL + ["step"]):
        cos = group_cosine(g, "inner_prev", "norm_prev", "norm")
        b = g["b_local_angle_deg"].dropna()
        rows.append({**dict(zip(CELL + ["step"], key)),
                     "angle": math.degrees(math.acos(min(1.0, max(-1.0, cos)))) if not math.isnan(cos) else np.nan,
                     "b_angle": float(b.mean()) if len(b) else np.nan})
    return pd.DataFrame(rows, columns=CELL + ["step", "angle", "b_angle"])


def weight_rotation_vs_step(rotation: pd.DataFrame, rates: pd.DataFrame, judge: dict, definition: str):
    title = "Rotation of the EM update vs EM training step"
    if rotation.empty:
        return _message_figure(title, "No weight table has a row."), f"{title}: nothing to show (no weight rows)."
    angles = _adapter_angles(rotation)
    angles["condition"] = tables.condition_label(angles)
    curves = angles.groupby(["model", "dataset", "condition", "step"], as_index=False)[["angle", "b_angle"]].mean()
    rates = rates.assign(condition=tables.condition_label(rates)) if len(rates) else rates
    em = (rates.groupby(["model", "dataset", "condition", "step"], as_index=False)["em_rate"].mean()
          if len(rates) else pd.DataFrame(columns=["model", "dataset", "condition", "step", "em_rate"]))
    panels = sorted(curves[["model", "dataset"]].drop_duplicates().itertuples(index=False))
    conditions, palette = _conditions(angles)
    fig, axes = _grid(len(panels), 1, title, sharey=False, extra_width=2.4)
    for i, (model, dataset) in enumerate(panels):
        ax = axes[i][0]
        twin = ax.twinx()
        for cond, g in curves[(curves["model"] == model) & (curves["dataset"] == dataset)].groupby("condition"):
            g = g.sort_values("step")
            ax.plot(g["step"], g["angle"], marker="o", ms=3, color=palette[cond])
            if g["b_angle"].notna().any():
                ax.plot(g["step"], g["b_angle"], ls=":", color=palette[cond])
            r = em[(em["model"] == model) & (em["dataset"] == dataset) & (em["condition"] == cond)].sort_values("step")
            twin.plot(r["step"], 100 * r["em_rate"].astype(float), ls="--", marker="s", ms=3, mfc="white",
                      color=palette[cond])
        ax.set_title(f"{model} · {dataset}")
        ax.set_xlabel("EM training step")
        ax.set_ylabel("angle to the previous snapshot (°)")
        ax.set_ylim(0, 180 if curves["angle"].max() > 90 else 90)
        twin.set_ylim(0, 100)
        twin.set_ylabel(f"EM rate, % ({definition})")
        twin.grid(False)
    handles = [Line2D([], [], color=palette[c], label=c) for c in conditions]
    handles += [Line2D([], [], color="black", label="whole EM adapter"),
                Line2D([], [], color="black", ls=":", label="B vector (rank 1)"),
                Line2D([], [], color="black", ls="--", marker="s", mfc="white", label="EM rate (right axis)")]
    fig.legend(handles=handles, loc="outside right center", title="persona (composition)", frameon=False)
    caption = (f"{title}: the angle between the EM LoRA updates s·B·A at consecutive snapshots (scheduled "
               f"checkpoints, and `checkpoints.trace_every` snapshots where the cell has them), over the whole adapter, "
               f"mean over seeds; undefined next to step 0, where the update is zero. Dotted: the angle between "
               f"consecutive B vectors of rank-1 modules (the Model Organisms for EM phase-transition signal). "
               f"Dashed, right axis: EM rate under {definition}, all questions, mean over seeds, judge "
               f"{provenance.judge_text(judge)} ({'no EM rate yet' if em.empty else 'evaluated steps only'}).")
    return fig, caption


def make_weight_figures(norm_paths: list[str], rotation_paths: list[str], em_rates_path: str, definition: str,
                        custom: dict, repo: str, config: dict, outputs: dict) -> None:
    """Both weight figures of one judge; `outputs` maps '<name>_<png|svg|caption|provenance>' to a path."""
    _style()
    norms, rotation = _read(norm_paths), _read(rotation_paths)
    d = get_definition(definition, custom)
    em_rates = read_table(em_rates_path)  # carries the judge's identity columns
    rates = tables.overall_rates(em_rates, d.name)
    judge = provenance.judge_identity(em_rates)
    shared = provenance.collect(repo, config, em_rates, [norms], em_definition=d.name)
    inputs = [*norm_paths, *rotation_paths, em_rates_path]
    built = {"weight_norms_vs_step": weight_norms_vs_step(norms, rates, judge),
             "weight_rotation_vs_step": weight_rotation_vs_step(rotation, rates, judge, d.name)}
    assert set(built) == set(WEIGHT_FIGURES)
    for name, (fig, caption) in built.items():
        paths = {kind: outputs[f"{name}_{kind}"] for kind in ("png", "svg", "caption")}
        save_figure(fig, paths, caption, note="Provenance: " + provenance.short_line(shared))
        provenance.write_sidecar(outputs[f"{name}_provenance"], name, list(paths.values()), inputs, shared,
                                 {"caption": caption})
