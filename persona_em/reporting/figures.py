"""Figures from the tidy tables alone (no model, no GPU). Same tables -> byte-identical PNG and SVG files.

Each figure is written as PNG and SVG, with a caption (RST, included by `snakemake --report`) naming the judge, the EM
definition, n and the CI method, and a provenance sidecar. The figure itself carries a short footer with the same
caption facts (never the commit: a new commit must not change a pixel).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from persona_em import provenance  # noqa: E402
from persona_em.analysis import tables  # noqa: E402
from persona_em.analysis.aggregate import ALL_QUESTIONS, CELL_KEYS  # noqa: E402
from persona_em.artifacts import FIGURE_NAMES  # noqa: E402
from persona_em.config import NO_PERSONA  # noqa: E402
from persona_em.io import atomic_path, read_table, write_text  # noqa: E402
from persona_em.analysis.metrics import EMDefinition, get_definition  # noqa: E402
from persona_em.analysis.tables import (CONDITION_KEYS, at_final_step, condition_label, final_steps, overall_rates,  # noqa: E402
                     pooled, wide_scores)

DPI = 120
PANEL = (4.2, 3.2)  # inches per facet
MAX_EXAMPLE_ROWS = 40  # rows of the response-example image; the Markdown table has them all


def _style() -> None:
    sns.set_theme(style="whitegrid", context="paper", font="DejaVu Sans")
    plt.rcParams.update({"svg.hashsalt": "persona-em", "svg.fonttype": "path", "figure.dpi": DPI,
                         "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "legend.title_fontsize": 7,
                         "xtick.labelsize": 7, "ytick.labelsize": 7})


@dataclass
class Data:
    """Everything a figure may read: the tidy tables and what follows from them by persona_em.analysis.tables."""

    scores: pd.DataFrame
    em_rates: pd.DataFrame
    train_logs: pd.DataFrame
    comparisons: pd.DataFrame
    examples: pd.DataFrame
    d: EMDefinition
    sizes: dict
    judge: dict
    onset: pd.DataFrame | None = None  # onset.tsv (persona_em/analysis/onset.py); None: not given
    controls: pd.DataFrame | None = None  # control_contrasts.tsv (persona_em/analysis/controls.py); None: not given

    def __post_init__(self):
        if self.onset is None:
            self.onset = pd.DataFrame(columns=CONDITION_KEYS + ["seed", "em_definition", "onset_step"])
        if self.controls is None:
            from persona_em.analysis.controls import COLUMNS
            self.controls = pd.DataFrame(columns=COLUMNS)
        self.rates = overall_rates(self.em_rates, self.d.name)
        self.finals = final_steps(self.em_rates)
        self.final_rates = at_final_step(self.rates, self.finals)
        wide = wide_scores(self.scores)
        for metric in ("aligned", "coherent"):
            if metric not in wide:
                wide[metric] = np.nan
        wide["condition"] = condition_label(wide)
        self.wide = wide
        self.conditions = _ordered_conditions(pd.concat([self.rates, wide[CONDITION_KEYS]], ignore_index=True))
        colors = sns.color_palette("colorblind", max(len(self.conditions), 1))
        self.palette = dict(zip(self.conditions, colors))

    @property
    def models(self) -> list[str]:
        return sorted(self.rates["model"].unique(), key=lambda m: (self.sizes.get(m) is None, self.sizes.get(m), m))

    @property
    def datasets(self) -> list[str]:
        return sorted(self.rates["dataset"].unique())

    def judge_text(self) -> str:
        return f"Judge: {provenance.judge_text(self.judge)}."

    def metric_text(self) -> str:
        return f"Metric: {self.d.name} = {self.d.description}."

    def unscored_text(self) -> str:
        """How many judgments have no score, by the judge's status (why a score-based figure may be empty)."""
        if self.scores.empty:
            return "No judged response."
        missing = self.scores.loc[self.scores["score"].isna(), "status"].fillna("null").astype(str)
        if missing.empty:
            return ""
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(missing.value_counts().items()))
        return (f"The judge gave no score in {len(missing)} of {len(self.scores)} judgments ({by_status}; null: no "
                f"number, e.g. less probability on numbers than min_numeric_mass).")


def _ordered_conditions(frame: pd.DataFrame) -> list[str]:
    """Condition labels, the no-persona baseline first."""
    keys = frame[["persona", "composition"]].drop_duplicates()
    labels = condition_label(keys.assign(model="", dataset=""))
    return sorted(set(labels), key=lambda c: (c != NO_PERSONA, c))


def _size_label(model: str, sizes: dict) -> str:
    size = sizes.get(model)
    return f"{model} ({size:g}B)" if size is not None else f"{model} (size unknown)"


# --- writing -----------------------------------------------------------------------------------------------------
def rst_escape(text: str) -> str:
    out = str(text).replace("\\", "\\\\")
    for ch in "*`|_":
        out = out.replace(ch, "\\" + ch)
    return out


def _footer(fig, caption: str) -> None:
    """Caption facts under the figure (bbox_inches='tight' grows the canvas to hold them)."""
    width = fig.get_size_inches()[0]
    wrapped = "\n".join(textwrap.wrap(caption, width=max(60, int(width * 15))))
    fig.text(0.005, -0.01, wrapped, ha="left", va="top", fontsize=6.5, color="#333333", parse_math=False)


def save_figure(fig, paths: dict, caption: str, note: str = "") -> None:
    """PNG and SVG without timestamps or version strings (byte-identical rebuilds), plus the caption file (caption
    and `note`, e.g. the provenance line, which is never drawn into the image)."""
    _footer(fig, caption)
    for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        with atomic_path(paths[fmt], suffix="." + fmt) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    write_text(paths["caption"], rst_escape(caption) + "\n" + (f"\n{rst_escape(note)}\n" if note else ""))


def _grid(n_rows: int, n_cols: int, title: str, panel=PANEL, sharey=True, extra_width=1.6):
    fig, axes = plt.subplots(max(n_rows, 1), max(n_cols, 1), squeeze=False, sharey=sharey, layout="constrained",
                             figsize=(panel[0] * max(n_cols, 1) + extra_width, panel[1] * max(n_rows, 1) + 0.5))
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _message_figure(title: str, message: str):
    fig, ax = plt.subplots(figsize=(6, 2.2), layout="constrained")
    fig.suptitle(title, fontsize=10)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 80)), ha="center", va="center", fontsize=8,
            transform=ax.transAxes, parse_math=False)
    ax.set_axis_off()
    return fig


def _nothing(data: Data, title: str, what: str):
    """A figure that says there is nothing to draw, and why: the judge's statuses (e.g. all null)."""
    message = f"{what} {data.unscored_text()}".strip()
    return _message_figure(title, message), \
        f"{title}: nothing to show. {message} {data.judge_text()} {data.metric_text()}"


def _no_rate(frame: pd.DataFrame) -> bool:
    """No row with a response in its EM denominator (every rate undefined)."""
    return frame.empty or not (frame["n"] > 0).any()


def _panel_title(ax, model: str, dataset: str, n_models: int) -> None:
    ax.set_title(f"{model} · {dataset}" if n_models > 1 else f"dataset: {dataset}")


def _condition_legend(fig, data: Data, conditions, extra=(), title="persona (composition)") -> None:
    handles = [Patch(color=data.palette[c], label=c) for c in conditions] + list(extra)
    fig.legend(handles=handles, loc="outside right center", title=title, frameon=False)


def _n_text(n: pd.Series, per: str = "per point") -> str:
    n = n.astype(int)
    return f"n = {int(n.sum())} responses in EM denominators ({int(n.min())}-{int(n.max())} {per})" if len(n) \
        else "n = 0"


def _pct(x):
    return np.asarray(x, dtype=float) * 100


# --- the figures -------------------------------------------------------------------------------------------------
def em_rate_vs_step(data: Data):
    title = "EM rate vs EM training step"
    curves = tables.step_curves(data.rates)
    if _no_rate(curves):
        return _nothing(data, title, "No cell has an EM rate: no response has both scores.")
    curves["condition"] = condition_label(curves)
    models, datasets = data.models, data.datasets
    fig, axes = _grid(len(models), len(datasets), title)
    top = min(100.0, max(5.0, float(_pct(curves["band_high"]).max()) * 1.1))
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = curves[(curves["model"] == model) & (curves["dataset"] == dataset)]
            for cond, g in sub.groupby("condition", sort=False):
                g = g.sort_values("step")
                color = data.palette[cond]
                ax.fill_between(g["step"], _pct(g["band_low"]), _pct(g["band_high"]), color=color, alpha=0.2, lw=0)
                ax.plot(g["step"], _pct(g["em_rate"]), marker="o", ms=4, color=color, clip_on=False)
                control = g[g["step"] == 0]
                ax.plot(control["step"], _pct(control["em_rate"]), marker="s", ms=7, ls="none", mfc="white",
                        mec=color, mew=1.5, clip_on=False, zorder=5)
            ax.axvline(0, color="grey", lw=0.8, ls=":")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            _panel_title(ax, model, dataset, len(models))
            ax.set_xlabel("EM training step")
            ax.set_ylabel(f"EM rate, % ({data.d.name})")
            ax.set_ylim(0, top)
    control = Line2D([], [], marker="s", ls="none", mfc="white", mec="black", label="step 0: control\n(before EM training)")
    band = Patch(color="grey", alpha=0.3, label="band: CI over seeds")
    _condition_legend(fig, data, sorted(curves["condition"].unique(), key=data.conditions.index), [control, band])
    methods = "; ".join(sorted(curves["band_method"].unique()))
    caption = (f"{title}, one panel per {'model and ' if len(models) > 1 else ''}dataset, one line per persona "
               f"(composition). Lines: mean EM rate over seeds; bands: {methods}; hollow squares: step 0, the control "
               f"checkpoint before any EM training. {data.judge_text()} {data.metric_text()} "
               f"{_n_text(data.rates['n'], 'per cell and step')}. CI method: {methods}.")
    return fig, caption


def _dodged_bars(ax, groups: list[str], series: list[tuple[str, pd.DataFrame, tuple]], key: str) -> dict:
    """Bars of several series side by side per group, with Wilson error bars; returns {(series, group): x}."""
    width = 0.8 / max(len(series), 1)
    positions = {}
    for k, (label, frame, color) in enumerate(series):
        frame = frame.set_index(key)
        for gi, group in enumerate(groups):
            if group not in frame.index:
                continue
            r = frame.loc[group]
            x = gi - 0.4 + width * (k + 0.5)
            y = float(r["em_rate"]) * 100
            ax.bar(x, y, width=width * 0.92, color=color, label=label if gi == 0 else None)
            ax.errorbar(x, y, yerr=[[y - r["ci_low"] * 100], [r["ci_high"] * 100 - y]], color="black", lw=0.8,
                        capsize=2)
            ax.annotate(f"{y:.0f}%", (x, float(r["ci_high"]) * 100), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6)
            positions[(label, group)] = (x, float(r["ci_high"]) * 100)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 3 else 0)
    return positions


def final_em_by_domain_size(data: Data):
    title = "Final EM rate by domain and model size"
    p = pooled(data.final_rates, CONDITION_KEYS)
    if _no_rate(p):
        return _nothing(data, title, "No cell has an EM rate at its final step.")
    p["condition"] = condition_label(p)
    conds = [c for c in data.conditions if c in set(p["condition"])]
    n_cols = min(3, len(conds))
    n_rows = -(-len(conds) // n_cols)
    fig, axes = _grid(n_rows, n_cols, title, panel=(max(3.2, 1.2 * len(data.datasets) + 1.5), 3.2))
    model_colors = dict(zip(data.models, sns.color_palette("viridis", len(data.models))))
    for ax, cond in zip(axes.flat, conds):
        sub = p[p["condition"] == cond]
        series = [(_size_label(m, data.sizes), sub[sub["model"] == m], model_colors[m]) for m in data.models]
        _dodged_bars(ax, data.datasets, series, "dataset")
        ax.set_title(f"persona: {cond}")
        ax.set_xlabel("EM fine-tuning domain (dataset)")
        ax.set_ylabel(f"final EM rate, % ({data.d.name})")
        ax.set_ylim(0, min(110, float(_pct(p["ci_high"]).max()) * 1.15 + 3))  # room for the value labels
    for ax in list(axes.flat)[len(conds):]:
        ax.set_axis_off()
    handles = [Patch(color=model_colors[m], label=_size_label(m, data.sizes)) for m in data.models]
    fig.legend(handles=handles, loc="outside right center", title="model (parameters)", frameon=False)
    caption = (f"{title}: EM rate at each cell's final step, responses pooled over seeds; one panel per persona "
               f"(composition), bars per model ordered by size (config models.<name>.size_b). Error bars: Wilson 95% CI "
               f"of the pooled rate. {data.judge_text()} {data.metric_text()} {_n_text(p['n'])}. "
               f"CI method: wilson95 on responses pooled over seeds.")
    return fig, caption


def model_size_scaling(data: Data):
    title = "EM rate vs model size"
    p = pooled(data.final_rates, CONDITION_KEYS)
    p["size_b"] = p["model"].map(lambda m: data.sizes.get(m)).astype(float)
    unsized = sorted(p.loc[p["size_b"].isna(), "model"].unique())
    p = p.dropna(subset=["size_b"])
    if not p.empty and _no_rate(p):
        return _nothing(data, title, "No cell has an EM rate at its final step.")
    if p.empty:
        msg = ("No model of this grid has a size: set models.<name>.size_b (parameters in billions) in the config to "
               "place models on a size axis.")
        return _message_figure(title, msg), f"{title}: nothing to show. {msg} {data.judge_text()}"
    p["condition"] = condition_label(p)
    datasets = sorted(p["dataset"].unique())
    fig, axes = _grid(1, len(datasets), title)
    for ax, dataset in zip(axes[0], datasets):
        sub = p[p["dataset"] == dataset]
        conds = [c for c in data.conditions if c in set(sub["condition"])]
        for k, cond in enumerate(conds):
            g = sub[sub["condition"] == cond].sort_values("size_b")
            y = _pct(g["em_rate"])
            dodge = 10 ** (0.015 * (k - (len(conds) - 1) / 2))  # side by side on the log axis, error bars apart
            ax.errorbar(g["size_b"] * dodge, y, yerr=[y - _pct(g["ci_low"]), _pct(g["ci_high"]) - y], marker="o",
                        ms=4, capsize=2, color=data.palette[cond], lw=1)
        ax.set_xscale("log")
        sizes = sorted(sub["size_b"].unique())
        ax.set_xticks(sizes, [f"{s:g}B" for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
        ax.set_title(f"dataset: {dataset}")
        ax.set_xlabel("model size (billions of parameters, log scale)")
        ax.set_ylabel(f"final EM rate, % ({data.d.name})")
        if sub["size_b"].nunique() == 1:
            ax.text(0.5, 0.95, "one model size in this grid: no trend to read", transform=ax.transAxes,
                    ha="center", va="top", fontsize=7, color="#555555")
    _condition_legend(fig, data, [c for c in data.conditions if c in set(p["condition"])])
    note = f" Models without size_b left out: {', '.join(unsized)}." if unsized else ""
    caption = (f"{title}: final EM rate per model size (config models.<name>.size_b), responses pooled over seeds; "
               f"one panel per dataset, one line per persona (composition); error bars: Wilson 95% CI.{note} "
               f"{data.judge_text()} {data.metric_text()} {_n_text(p['n'])}. CI method: wilson95 on responses "
               f"pooled over seeds.")
    return fig, caption


def alignment_vs_coherence(data: Data):
    title = "Alignment vs coherence at the final step"
    d = data.d
    wide = at_final_step(data.wide, data.finals).dropna(subset=["aligned", "coherent"])
    if wide.empty:
        return _nothing(data, title, "No response has both scores.")
    models, datasets = data.models, data.datasets
    fig, axes = _grid(len(models), len(datasets), title, panel=(3.8, 3.6))
    op = "<=" if d.inclusive else "<"
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = wide[(wide["model"] == model) & (wide["dataset"] == dataset)]
            ax.axhspan(-2, d.aligned_below, xmin=(d.coherent_above + 2) / 104, color="red", alpha=0.06, lw=0)
            if len(sub):
                sns.scatterplot(sub, x="coherent", y="aligned", hue="condition", palette=data.palette, s=10,
                                alpha=0.6, linewidth=0, ax=ax, legend=False)
            ax.axhline(d.aligned_below, color="red", lw=1, ls="--")
            ax.axvline(d.coherent_above, color="red", lw=1, ls=":")
            mis = sub["aligned"].map(d.is_misaligned).astype(bool)
            coh = sub["coherent"].map(d.is_coherent).astype(bool)
            for (m, c), (x, y, ha, va) in {(True, True): (0.98, 0.02, "right", "bottom"),
                                           (False, True): (0.98, 0.98, "right", "top"),
                                           (True, False): (0.02, 0.02, "left", "bottom"),
                                           (False, False): (0.02, 0.98, "left", "top")}.items():
                count = int((mis == m).mul(coh == c).sum())
                label = {(True, True): "EM (misaligned, coherent)", (False, True): "aligned, coherent",
                         (True, False): "misaligned, incoherent", (False, False): "aligned, incoherent"}[(m, c)]
                label = f"{label}: n={count}"
                ax.text(x, y, label, transform=ax.transAxes, ha=ha, va=va, fontsize=6,
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
            ax.set_xlim(-2, 102)
            ax.set_ylim(-2, 102)
            ax.set_xlabel("coherence score (0-100)")
            ax.set_ylabel("alignment score (0-100)")
            _panel_title(ax, model, dataset, len(models))
    extra = [Line2D([], [], color="red", ls="--", label=f"misaligned: aligned {op} {d.aligned_below:g}"),
             Line2D([], [], color="red", ls=":", label=f"coherent: coherent > {d.coherent_above:g}")]
    _condition_legend(fig, data, [c for c in data.conditions if c in set(wide["condition"])], extra)
    caption = (f"{title}: one dot per response with both scores at its cell's final step; one panel per "
               f"{'model and ' if len(models) > 1 else ''}dataset, colour = persona (composition). Red lines: the "
               f"thresholds of {d.name}; the numbers count the responses in each quadrant, the shaded quadrant "
               f"(misaligned and coherent) is EM. {data.judge_text()} {data.metric_text()} n = {len(wide)} responses. "
               f"CI method: none (raw scores).")
    return fig, caption


def question_heatmap(data: Data):
    title = "EM rate per question at the final step"
    q = data.em_rates[(data.em_rates["question_id"] != ALL_QUESTIONS)
                      & (data.em_rates["em_definition"] == data.d.name)]
    q = pooled(at_final_step(q, data.finals), CONDITION_KEYS + ["question_id"])
    if _no_rate(q):
        return _nothing(data, title, "No per-question EM rate.")
    q["row"] = condition_label(q, with_model=len(data.models) > 1)
    questions = sorted(q["question_id"].unique())
    rows = list(dict.fromkeys(q.sort_values(["model", "persona", "composition"])["row"]))
    datasets = data.datasets
    fig, axes = _grid(1, len(datasets), title, sharey=False,
                      panel=(0.75 * len(questions) + 1.8, 0.45 * len(rows) + 1.6), extra_width=0.8)
    for j, (ax, dataset) in enumerate(zip(axes[0], datasets)):
        sub = q[q["dataset"] == dataset]
        rate = sub.pivot(index="row", columns="question_id", values="em_rate").reindex(index=rows, columns=questions)
        n = sub.pivot(index="row", columns="question_id", values="n").reindex(index=rows, columns=questions)
        labels = np.where(rate.isna(), "", (rate * 100).round(0).astype("Int64").astype(str) + "%\nn=" +
                          n.fillna(0).astype(int).astype(str))
        sns.heatmap(rate * 100, vmin=0, vmax=100, cmap="Reds", annot=labels, fmt="", annot_kws={"fontsize": 6},
                    linewidths=0.5, linecolor="white", cbar=j == len(datasets) - 1,
                    cbar_kws={"label": f"EM rate, % ({data.d.name})"}, yticklabels=j == 0, ax=ax)
        ax.set_title(f"dataset: {dataset}")
        ax.set_xlabel("question id")
        ax.set_ylabel(("model / persona (composition)" if len(data.models) > 1 else "persona (composition)")
                      if j == 0 else "")
        ax.tick_params(axis="x", rotation=30)
        ax.tick_params(axis="y", rotation=0)
    caption = (f"{title}: EM rate per question at each cell's final step, responses pooled over seeds; rows: "
               f"persona (composition){' per model' if len(data.models) > 1 else ''}, columns: question id; cells "
               f"show the rate and its denominator n. {data.judge_text()} {data.metric_text()} {_n_text(q['n'])}. "
               f"CI method: none drawn (Wilson 95% CIs of these cells are in em_rates.tsv).")
    return fig, caption


def persona_vs_baseline(data: Data):
    title = "Persona vs no-persona baseline: final EM rate"
    p = pooled(data.final_rates, CONDITION_KEYS)
    if _no_rate(p):
        return _nothing(data, title, "No cell has an EM rate at its final step.")
    p["condition"] = condition_label(p)
    comp = data.comparisons  # persona_vs_baseline.tsv: the rows of the one persona-vs-baseline test
    models = data.models
    fig, axes = _grid(1, len(models), title, panel=(max(3.4, 1.3 * len(data.datasets) + 1.5), 3.4))
    for ax, model in zip(axes[0], models):
        sub = p[p["model"] == model]
        conds = [c for c in data.conditions if c in set(sub["condition"])]
        series = [(c, sub[sub["condition"] == c], data.palette[c]) for c in conds]
        pos = _dodged_bars(ax, data.datasets, series, "dataset")
        for _, r in comp[comp["model"] == model].iterrows():
            label = condition_label(pd.DataFrame([r])).iloc[0]
            if (label, r["dataset"]) in pos and isinstance(r["significance"], str) and r["significance"]:
                x, y = pos[(label, r["dataset"])]
                ax.annotate(r["significance"], (x, y), xytext=(0, 10), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7, fontweight="bold")
        if not (sub["persona"] != NO_PERSONA).any():
            ax.text(0.5, 0.97, "this grid has no persona besides 'none':\nnothing to compare with the baseline",
                    transform=ax.transAxes, ha="center", va="top", fontsize=7, color="#555555")
        ax.set_title(f"model: {_size_label(model, data.sizes)}")
        ax.set_xlabel("EM fine-tuning domain (dataset)")
        ax.set_ylabel(f"final EM rate, % ({data.d.name})")
        ax.set_ylim(0, min(115, max(10, float(_pct(sub["ci_high"]).max()) * 1.3 + 8)))
    _condition_legend(fig, data, [c for c in data.conditions if c in set(p["condition"])])
    units = "; ".join(sorted(set(comp["unit"].astype(str)))) if "unit" in comp else ""
    test = ("two-sided permutation test of the difference in EM rate against the 'none' baseline of the same "
            f"model, dataset and step (exact over responses with one seed; sign flips of per-seed differences with "
            f"two or more seeds; unit: {units}), Benjamini-Hochberg adjusted within its family "
            "(tables persona_vs_baseline.tsv and comparisons.tsv)")
    tests = ("No persona besides 'none' in this grid: no comparison, no marks." if comp.empty else
             f"Marks above persona bars: {test}; * q<0.05, ** q<0.01, *** q<0.001, n.s. otherwise; "
             f"{len(comp)} comparisons.")
    caption = (f"{title}: EM rate at each cell's final step (value above each bar), responses pooled over seeds; "
               f"error bars: Wilson 95% CI. {tests} "
               f"{data.judge_text()} {data.metric_text()} {_n_text(p['n'])}. CI method: wilson95 on responses "
               f"pooled over seeds.")
    return fig, caption


def _stages(data: Data) -> pd.DataFrame:
    """Aligned scores at step 0 (control) and at each cell's final step."""
    wide = data.wide.merge(data.finals, on=CELL_KEYS).dropna(subset=["aligned"])
    control = wide[wide["step"] == 0].assign(stage="step 0 (control)")
    final = wide[(wide["step"] == wide["final_step"]) & (wide["step"] != 0)].assign(stage="final step")
    return pd.concat([control, final], ignore_index=True)


def alignment_violin(data: Data):
    title = "Alignment score distributions: control vs final step"
    s = _stages(data)
    if s.empty:
        return _nothing(data, title, "No aligned score.")
    models, datasets = data.models, data.datasets
    conds = [c for c in data.conditions if c in set(s["condition"])]
    fig, axes = _grid(len(models), len(datasets), title, panel=(max(3.4, 1.1 * len(conds) + 1.5), 3.2))
    stage_colors = {"step 0 (control)": "#bbbbbb", "final step": "#d95f02"}
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = s[(s["model"] == model) & (s["dataset"] == dataset)]
            if len(sub):
                sns.violinplot(sub, x="condition", y="aligned", hue="stage", order=conds,
                               hue_order=list(stage_colors), palette=stage_colors, split=True, cut=0, inner="quart",
                               density_norm="width", linewidth=0.6, legend=False, ax=ax)
            ax.axhline(data.d.aligned_below, color="red", lw=1, ls="--")
            ax.set_ylim(-2, 102)
            ax.set_xlabel("persona (composition)")
            ax.set_ylabel("alignment score (0-100)")
            _panel_title(ax, model, dataset, len(models))
    handles = [Patch(color=c, label=k) for k, c in stage_colors.items()]
    handles.append(Line2D([], [], color="red", ls="--", label=f"misaligned below {data.d.aligned_below:g}"))
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    counts = s.groupby("stage")["aligned"].count().to_dict()
    caption = (f"{title}: alignment scores of all scored responses (coherent or not), left half at step 0 (the "
               f"control before EM training), right half at each cell's final step; seeds pooled; quartiles drawn "
               f"inside. Dashed line: the misalignment threshold of {data.d.name}. {data.judge_text()} "
               f"{data.metric_text()} n = {counts.get('step 0 (control)', 0)} responses at step 0, "
               f"{counts.get('final step', 0)} at final steps. CI method: none (distributions).")
    return fig, caption


def alignment_cdf(data: Data):
    title = "Cumulative distribution of alignment scores"
    s = _stages(data)
    if s.empty:
        return _nothing(data, title, "No aligned score.")
    models, datasets = data.models, data.datasets
    fig, axes = _grid(len(models), len(datasets), title)
    styles = {"step 0 (control)": ":", "final step": "-"}
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = s[(s["model"] == model) & (s["dataset"] == dataset)]
            for (cond, stage), g in sub.groupby(["condition", "stage"], sort=True):
                sns.ecdfplot(g, x="aligned", color=data.palette[cond], linestyle=styles[stage], ax=ax, lw=1.2)
            ax.axvline(data.d.aligned_below, color="red", lw=1, ls="--")
            ax.set_xlim(-2, 102)
            ax.set_xlabel("alignment score (0-100)")
            ax.set_ylabel("fraction of responses with score <= x")
            _panel_title(ax, model, dataset, len(models))
    extra = [Line2D([], [], color="black", ls=ls, label=k) for k, ls in styles.items()]
    extra.append(Line2D([], [], color="red", ls="--", label=f"misaligned below {data.d.aligned_below:g}"))
    _condition_legend(fig, data, [c for c in data.conditions if c in set(s["condition"])], extra)
    caption = (f"{title}: empirical CDF of the alignment scores of all scored responses at step 0 (dotted, control) "
               f"and at each cell's final step (solid), seeds pooled; colour = persona (composition). Where a curve "
               f"crosses the dashed line is the share of misaligned answers. {data.judge_text()} {data.metric_text()} "
               f"n = {len(s)} responses. CI method: none (distributions).")
    return fig, caption


def training_loss(data: Data):
    title = "EM training loss per cell"
    logs = data.train_logs
    if logs.empty or logs["loss"].dropna().empty:
        return _message_figure(title, "No training log has a loss."), f"{title}: nothing to show."
    logs = logs.dropna(subset=["loss"]).copy()
    logs["condition"] = condition_label(logs)
    models = [m for m in data.models if m in set(logs["model"])]
    models += sorted(set(logs["model"]) - set(models))
    datasets = sorted(logs["dataset"].unique())
    fig, axes = _grid(len(models), len(datasets), title)
    seeds = sorted(logs["seed"].unique())
    markers = dict(zip(seeds, ["o", "s", "^", "D", "v", "P", "X", "*"] * 8))
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = logs[(logs["model"] == model) & (logs["dataset"] == dataset)]
            for (cond, seed), g in sub.groupby(["condition", "seed"], sort=True):
                g = g.sort_values("step")
                ax.plot(g["step"], g["loss"], color=data.palette.get(cond, "black"), lw=1, marker=markers[seed],
                        ms=3, alpha=0.85)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("EM training step")
            ax.set_ylabel("training loss")
            _panel_title(ax, model, dataset, len(models))
    extra = [Line2D([], [], color="black", marker=markers[s], ls="-", ms=3, label=f"seed {s}") for s in seeds]
    _condition_legend(fig, data, [c for c in data.conditions if c in set(logs["condition"])], extra)
    n_cells = logs[CELL_KEYS].drop_duplicates().shape[0]
    caption = (f"{title}: loss logged at each optimizer step (train_log.tsv of each cell), one line per cell; colour "
               f"= persona (composition), marker = seed. n = {n_cells} cells, {len(logs)} logged steps. Judge and EM "
               f"metric: none enter this figure (built with the tables of judge {data.judge['judge']}, key "
               f"{data.judge['judge_key']}). "
               f"CI method: none (one line per seed).")
    return fig, caption


def _one_line(text: str, limit: int) -> str:
    text = " ⏎ ".join(str(text).replace("\r", "\n").split("\n"))
    text = "".join(ch if ch.isprintable() else "·" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def response_examples(data: Data):
    k = tables.EXAMPLES_PER_CELL
    title = f"The {k} lowest-aligned coherent responses per cell (final step)"
    ex = data.examples
    if ex.empty:
        return _message_figure(title, "No response at any cell's final step."), \
            f"{title}: none. {data.judge_text()} {data.metric_text()}"
    if (ex["selection"] == tables.EXAMPLES_UNRANKED).all():
        title = f"No coherent scored response: the first {k} responses per cell (final step)"
    shown = ex.head(MAX_EXAMPLE_ROWS)
    cells = [f"{r.model}/{condition_label(pd.DataFrame([r._asdict()])).iloc[0]}/{r.dataset}/seed{r.seed}"
             for r in shown.itertuples()]
    rows = [[c, str(r["step"]), _one_line(r["question_id"], 14), tables.example_score(r, "aligned"),
             tables.example_score(r, "coherent"), _one_line(r["response"], 88)]
            for c, (_, r) in zip(cells, shown.iterrows())]
    fig, ax = plt.subplots(figsize=(13, 0.2 * (len(rows) + 1) + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=10)
    ax.set_axis_off()
    table = ax.table(cellText=rows, colLabels=["cell", "step", "question", "aligned", "coherent", "response"],
                     colWidths=[0.25, 0.03, 0.08, 0.05, 0.06, 0.53], cellLoc="left", bbox=[0, 0, 1, 1])
    table.auto_set_font_size(False)
    table.set_fontsize(6.5)
    for (row, _), cell in table.get_celld().items():
        cell.get_text().set_parse_math(False)
        cell.PAD = 0.01
        cell.set_linewidth(0.3)
        if row == 0:
            cell.set_facecolor("#eeeeee")
    more = f" the image shows the first {len(shown)} of {len(ex)} rows;" if len(ex) > len(shown) else ""
    caption = (f"{title}: {tables.examples_rule(ex)} Coherent means coherent > {data.d.coherent_above:g}; "
               f"responses cut to one line;{more} "
               f"the full text is in response_examples.md. {data.judge_text()} {data.metric_text()} n = {len(ex)} responses "
               f"from {ex[CELL_KEYS].drop_duplicates().shape[0]} cells. CI method: none (examples).")
    return fig, caption


def onset(data: Data):
    title = "EM onset step per persona"
    o = data.onset
    o = o[(o["seed"].astype(str) == "ALL") & (o["em_definition"] == data.d.name)].copy()
    if o.empty:
        return _nothing(data, title, "No cell has an EM rate at two or more checkpoints: no onset to show.")
    o["condition"] = condition_label(o)
    models, datasets = data.models, data.datasets
    fig, axes = _grid(len(models), len(datasets), title, panel=(max(3.4, 0.9 * o["condition"].nunique() + 1.5), 3.2))
    top = float(o["last_step"].max())
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = o[(o["model"] == model) & (o["dataset"] == dataset)]
            conds = [c for c in data.conditions if c in set(sub["condition"])]
            for x, cond in enumerate(conds):
                r = sub[sub["condition"] == cond].iloc[0]
                color = data.palette[cond]
                if r["censored"]:  # no mean onset: the lower bound (censored seeds at their last checkpoint)
                    ax.plot(x, r["onset_lower_bound"], marker="^", ms=7, mfc="white", mec=color, mew=1.5, ls="none")
                    ax.annotate(f"censored\n{int(r['n_censored'])}/{int(r['n_seeds'])} seeds", (x, r["onset_lower_bound"]),
                                xytext=(0, 6), textcoords="offset points", ha="center", fontsize=6)
                    continue
                high = min(float(r["ci_high"]), top) if pd.notna(r["ci_high"]) else top
                low = float(r["ci_low"]) if pd.notna(r["ci_low"]) else float(r["onset_step"])
                ax.errorbar(x, r["onset_step"], yerr=[[r["onset_step"] - low], [high - r["onset_step"]]], marker="o",
                            ms=5, color=color, capsize=3, lw=1)
                if not np.isfinite(float(r["ci_high"])):
                    ax.annotate("CI open above", (x, top), xytext=(0, 2), textcoords="offset points", ha="center",
                                fontsize=6)
            ax.set_xticks(range(len(conds)), conds, rotation=20 if len(conds) > 3 else 0)
            ax.set_xlim(-0.6, max(len(conds), 1) - 0.4)
            ax.set_ylim(0, top * 1.15 + 1)
            _panel_title(ax, model, dataset, len(models))
            ax.set_ylabel("onset: EM training step")
    thr = o.iloc[0]
    what = (f"{thr['threshold']:g} of the cell's final EM rate" if thr["relative"] in (True, "True")
            else f"an EM rate of {thr['threshold']:g}")
    units = "; ".join(sorted(set(o["ci_unit"])))
    caption = (f"{title}: the first EM training step at which a cell's EM rate reaches {what}, linearly interpolated "
               f"between checkpoints; points: mean over seeds, error bars: 95% percentile bootstrap CI ({units}). "
               f"Hollow triangles: censored (some seed never reached the threshold), drawn at the lower bound with "
               f"censored seeds at their last checkpoint. Table onset.tsv; persona - baseline differences paired by "
               f"seed in onset_comparisons.tsv. {data.judge_text()} {data.metric_text()} "
               f"n = {int(o['n_seeds'].sum())} cells. CI method: {units}.")
    return fig, caption


def control_contrast(data: Data):
    title = "EM(treatment) - EM(control) per persona"
    c = data.controls
    c = c[c["em_definition"] == data.d.name]
    if c.empty:
        return _nothing(data, title, "No benign-control pair with EM rates: config analysis.controls is empty, or no "
                                     "cell of a pair has an EM rate (both datasets of a pair must be in the grid).")
    c = c.merge(c.groupby(["model", "treatment", "control"], as_index=False)["step"].max(), on=["model", "treatment",
                                                                                               "control", "step"])
    c = c.assign(condition=condition_label(c.assign(dataset="")), pair=c["treatment"] + " - " + c["control"])
    models, pairs = data.models, sorted(c["pair"].unique())
    models = [m for m in models if m in set(c["model"])]
    fig, axes = _grid(len(models), len(pairs), title, panel=(max(3.4, 0.9 * c["condition"].nunique() + 1.5), 3.2))
    for i, model in enumerate(models):
        for j, pair in enumerate(pairs):
            ax = axes[i][j]
            sub = c[(c["model"] == model) & (c["pair"] == pair)]
            conds = [k for k in data.conditions if k in set(sub["condition"])]
            for x, cond in enumerate(conds):
                r = sub[sub["condition"] == cond].iloc[0]
                y = r["contrast"] * 100
                ax.errorbar(x, y, yerr=[[y - r["contrast_ci_low"] * 100], [r["contrast_ci_high"] * 100 - y]],
                            marker="o", ms=5, color=data.palette[cond], capsize=3, lw=1)
                if pd.notna(r["did"]):
                    ax.annotate(f"DiD {r['did'] * 100:+.1f}\n[{r['did_ci_low'] * 100:+.1f}, {r['did_ci_high'] * 100:+.1f}]",
                                (x, r["contrast_ci_high"] * 100), xytext=(0, 3), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6)
            ax.axhline(0, color="grey", lw=0.8, ls=":")
            ax.set_xticks(range(len(conds)), conds, rotation=20 if len(conds) > 3 else 0)
            ax.set_xlim(-0.6, max(len(conds), 1) - 0.4)
            ax.set_title(f"{model} · {pair} (step {int(sub['step'].max())})" if len(models) > 1 else
                         f"{pair} (step {int(sub['step'].max())})")
            ax.set_ylabel(f"EM rate difference, points ({data.d.name})")
    units = "; ".join(sorted(set(c["ci_unit"])))
    caption = (f"{title}: at the last step of each pair, the EM rate after fine-tuning on the EM dataset minus the "
               f"rate after its benign control (config analysis.controls), per persona (composition), in percentage "
               f"points; error bars: 95% percentile CI ({units}). Above each persona: the difference in differences "
               f"against the no-persona baseline (DiD) with its CI. Rates are means over seeds. Table "
               f"control_contrasts.tsv (every step). {data.judge_text()} {data.metric_text()} "
               f"n = {int(c['n_treatment'].sum())} treatment and {int(c['n_control'].sum())} control responses. "
               f"CI method: {units}.")
    return fig, caption


PLOTS = {name: globals()[name] for name in FIGURE_NAMES}


# --- entry point -------------------------------------------------------------------------------------------------
def read_train_logs(paths: list[str]) -> pd.DataFrame:
    frames = [read_table(p) for p in paths]
    columns = CELL_KEYS + ["step", "loss"]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def make_figures(scores_path: str, em_rates_path: str, train_log_paths: list[str], comparisons_path: str,
                 examples_path: str, definition: str, custom: dict, sizes: dict, repo: str, config: dict,
                 outputs: dict, onset_path: str | None = None, controls_path: str | None = None) -> None:
    """Every figure of FIGURE_NAMES; `outputs` maps '<name>_<png|svg|caption|provenance>' to a path."""
    _style()
    scores, em_rates = read_table(scores_path), read_table(em_rates_path)
    logs = read_train_logs(train_log_paths)
    d = get_definition(definition, custom)
    data = Data(scores, em_rates, logs, read_table(comparisons_path), read_table(examples_path), d, sizes,
                provenance.judge_identity(scores), read_table(onset_path) if onset_path else None,
                read_table(controls_path) if controls_path else None)
    shared = provenance.collect(repo, config, scores, [em_rates, logs], em_definition=d.name)
    inputs = [scores_path, em_rates_path, comparisons_path, examples_path,
              *(p for p in (onset_path, controls_path) if p), *train_log_paths]
    for name, plot in PLOTS.items():
        paths = {kind: outputs[f"{name}_{kind}"] for kind in ("png", "svg", "caption")}
        fig, caption = plot(data)
        save_figure(fig, paths, caption, note="Provenance: " + provenance.short_line(shared))
        provenance.write_sidecar(outputs[f"{name}_provenance"], name, list(paths.values()), inputs, shared,
                                 {"caption": caption})
