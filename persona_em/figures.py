"""Figures from the tidy tables alone (no model, no GPU). Same tables -> byte-identical files."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .aggregate import wide_scores  # noqa: E402
from .io import atomic_path, read_table  # noqa: E402
from .metrics import get_definition  # noqa: E402

plt.rcParams["svg.hashsalt"] = "persona-em"  # fixed ids in SVG output


def save_figure(fig, path: str) -> None:
    """Save without timestamps or version strings, so rebuilds are byte-identical."""
    suffix = "." + path.rsplit(".", 1)[-1]
    metadata = {"Software": None} if suffix == ".png" else {"Date": None, "Creator": None}
    with atomic_path(path, suffix=suffix) as tmp:
        fig.savefig(tmp, dpi=120, metadata=metadata, bbox_inches="tight")
    plt.close(fig)


def _condition(frame: pd.DataFrame) -> pd.Series:
    return frame["model"] + " / " + frame["persona"] + " (" + frame["composition"] + ")"


def em_rate_vs_step(em_rates: pd.DataFrame, definition: str, judge: str, out: str) -> None:
    data = em_rates[(em_rates["question_id"] == "ALL") & (em_rates["em_definition"] == definition)].copy()
    data["condition"] = _condition(data)
    datasets = sorted(data["dataset"].unique())
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 4), squeeze=False,
                             sharey=True)
    for ax, ds in zip(axes[0], datasets):
        sub = data[data["dataset"] == ds]
        sns.lineplot(sub, x="step", y="em_rate", hue="condition", marker="o", errorbar=("ci", 95), seed=0,
                     ax=ax, n_boot=200)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"dataset: {ds}")
        ax.set_xlabel("EM training step (0 = before EM training)")
        ax.set_ylabel(f"EM rate ({definition})")
        ax.set_ylim(-0.02, 1.02)
    n = int(data["n"].sum())
    d = get_definition(definition)
    fig.suptitle(f"EM rate vs training step. Judge: {judge}. Metric: {definition} = {d.description}.\n"
                 f"Lines: mean over seeds, bands: 95% bootstrap CI over seeds; n = {n} responses in denominators.",
                 fontsize=8)
    save_figure(fig, out)


def alignment_vs_coherence(scores: pd.DataFrame, definition: str, judge: str, out: str) -> None:
    wide = wide_scores(scores).dropna(subset=["aligned", "coherent"])
    d = get_definition(definition)
    fig, ax = plt.subplots(figsize=(6, 5))
    wide["condition"] = wide["persona"] + " (" + wide["composition"] + ")"
    sns.scatterplot(wide, x="coherent", y="aligned", hue="condition", s=12, alpha=0.6, ax=ax)
    ax.axhline(d.aligned_below, color="red", lw=1, ls="--", label=f"aligned threshold {d.aligned_below:g}")
    ax.axvline(d.coherent_above, color="red", lw=1, ls=":", label=f"coherent threshold {d.coherent_above:g}")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Alignment vs coherence (judge {judge}, {definition}; n = {len(wide)})", fontsize=9)
    save_figure(fig, out)


def make_figures(scores_path: str, em_rates_path: str, judge: str, definition: str, outputs: dict) -> None:
    scores = read_table(scores_path)
    rates = read_table(em_rates_path)
    em_rate_vs_step(rates, definition, judge, outputs["em_rate_vs_step"])
    alignment_vs_coherence(scores, definition, judge, outputs["alignment_vs_coherence"])
