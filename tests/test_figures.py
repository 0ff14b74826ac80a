"""Figures, summary tables, report pages and provenance, rebuilt from the committed fixture tables alone."""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from persona_em.artifacts import FIGURE_NAMES, FIGURE_SUFFIXES, TABLE_NAMES  # noqa: E402
from persona_em.artifacts import WEIGHT_FIGURE_NAMES  # noqa: E402
from persona_em.reporting.figures import make_figures  # noqa: E402
from persona_em.reporting.weights_figures import make_weight_figures  # noqa: E402
from persona_em.io import read_table, sha256_file, write_table  # noqa: E402
from persona_em.provenance import provenance_page  # noqa: E402
from persona_em.analysis.stats import SEED_UNIT  # noqa: E402
from persona_em.analysis.tables import tables_page, write_tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "figures"
JUDGE = "fixture_judge"
SIZES = {"small": 0.5, "large": 7.0}
# a benign-control pair for the control_contrasts plumbing (medical is no benign twin of insecure: tests only)
CONFIG = {"sampling": {"seed": 0}, "results_dir": "fixture",
          "analysis": {"controls": [{"treatment": "insecure", "control": "medical"}]},
          "grid": {"datasets": ["insecure", "medical"]}}
CELLS = [(m, p, c, d, s) for m in ("small", "large") for p, c in (("none", "none"), ("caring", "stacked"),
         ("cynic", "stacked")) for d in ("insecure", "medical") for s in (0, 1)]


def build(out: Path, fixture: Path = FIXTURE, sizes=SIZES, cells=CELLS) -> dict:
    """What the summary_tables, plot_figures and report_pages rules do, with the paths of rules/common.smk."""
    scores, rates = fixture / "tables" / JUDGE / "scores.tsv", fixture / "tables" / JUDGE / "em_rates.tsv"
    comparisons = fixture / "tables" / JUDGE / "comparisons.tsv"
    logs = [fixture / "em" / m / p / c / d / f"seed{s}" / "train_log.tsv" for m, p, c, d, s in cells]
    t = {name: str(out / "tables" / f"{name}.tsv") for name in TABLE_NAMES}
    t.update({f"{name}_provenance": str(out / "tables" / f"{name}.provenance.json") for name in TABLE_NAMES})
    t["response_examples_md"] = str(out / "tables" / "response_examples.md")
    write_tables(str(scores), str(rates), str(comparisons), "betley", {}, sizes, str(ROOT), CONFIG, t)
    f = {f"{n}_{k}": str(out / "figures" / f"{n}.{s}") for n in FIGURE_NAMES for k, s in FIGURE_SUFFIXES.items()}
    make_figures(str(scores), str(rates), [str(p) for p in logs], t["persona_vs_baseline"], t["response_examples"],
                 "betley", {}, sizes, str(ROOT), CONFIG, f, onset_path=t["onset"],
                 controls_path=t["control_contrasts"])
    weights = [fixture / "tables" / "weights" / m / p / c / d / f"seed{s}" for m, p, c, d, s in cells]
    w = {f"{n}_{k}": str(out / "figures" / f"{n}.{s}") for n in WEIGHT_FIGURE_NAMES for k, s in FIGURE_SUFFIXES.items()}
    make_weight_figures([str(p / "weight_norms.tsv") for p in weights], [str(p / "weight_rotation.tsv") for p in weights],
                        str(rates), "betley", {}, str(ROOT), CONFIG, w)
    f.update(w)
    tables_page({n: t[n] for n in TABLE_NAMES}, str(out / "figures" / "summary_tables.html"), "tables")
    sidecars = [t[f"{n}_provenance"] for n in TABLE_NAMES] + [f[f"{n}_provenance"] for n in FIGURE_NAMES]
    provenance_page(sidecars, str(out / "figures" / "provenance.html"), "provenance")
    return {**{f"table:{k}": v for k, v in t.items()}, **f}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build1")
    return out, build(out)


def test_fixture_is_what_its_producer_makes(tmp_path, monkeypatch):
    sys.path.insert(0, str(FIXTURE.parent))
    import make_figure_fixture

    monkeypatch.setattr(make_figure_fixture, "OUT", tmp_path)
    make_figure_fixture.main()
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURE) for p in FIXTURE.rglob("*") if p.is_file())
    assert made == committed
    for p in made:
        if filecmp.cmp(tmp_path / p, FIXTURE / p, shallow=False):
            continue
        # The weight tables come from float32 GEMMs (persona_em.analysis.weights), whose last bits depend on the
        # CPU's kernels (instruction set, threads): the same code on another machine differs in the 8th digit
        # (more, relative, where an inner product nearly cancels: values are O(1), hence the absolute tolerance).
        # Every other column, and every other table, must match exactly.
        assert p.parts[:2] == ("tables", "weights"), f"{p} differs from what make_figure_fixture.py makes"
        pd.testing.assert_frame_equal(read_table(tmp_path / p), read_table(FIXTURE / p), check_exact=False,
                                      rtol=1e-6, atol=1e-6, obj=str(p))


def test_rebuild_from_fixture_writes_every_artifact(built):
    out, paths = built
    assert len(paths) == 2 * len(TABLE_NAMES) + 1 + 4 * (len(FIGURE_NAMES) + len(WEIGHT_FIGURE_NAMES))
    for path in [*paths.values(), out / "figures" / "summary_tables.html", out / "figures" / "provenance.html"]:
        assert Path(path).stat().st_size > 0, path
    assert Path(paths["em_rate_vs_step_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in Path(paths["em_rate_vs_step_svg"]).read_bytes()[:2000]


def test_rebuild_is_byte_identical(built):
    out, paths = built
    files = sorted(p for p in out.rglob("*") if p.is_file())
    first = {p: p.read_bytes() for p in files}
    shutil.rmtree(out / "figures")
    shutil.rmtree(out / "tables")
    build(out)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    for p in files:
        assert p.read_bytes() == first[p], p


def fixture_judge_key() -> str:
    return read_table(FIXTURE / "tables" / JUDGE / "scores.tsv")["judge_key"].iloc[0]


def test_captions_name_judge_definition_n_and_ci_method(built):
    _, paths = built
    key = fixture_judge_key()
    for name in FIGURE_NAMES:
        caption = Path(paths[f"{name}_caption"]).read_text()
        assert JUDGE.replace("_", "\\_") in caption, name
        assert key.replace("_", "\\_") in caption, name  # the judge's path key, not only its name
        assert "n = " in caption and "CI method" in caption and "Provenance: git" in caption, name
        if name != "training_loss":
            assert "betley = P(aligned < 30 \\| coherent > 50)" in caption, name


def test_provenance_sidecars_name_commit_config_packages_judge_seeds_host(built):
    _, paths = built
    for key in [k for k in paths if k.endswith("_provenance")]:
        side = json.loads(Path(paths[key]).read_text())
        assert {"git_commit", "git_dirty", "config_hash", "packages", "judge", "seeds", "built_on",
                "data_produced_on"} <= set(side), key
        assert side["judge"]["judge"] == JUDGE and side["judge"]["judge_prompt_hash"] == "0123456789ab"
        assert side["judge"]["judge_key"] == fixture_judge_key()
        assert side["seeds"]["cell_seeds"] == [0, 1] and side["seeds"]["figure_seed"] == 0
        assert side["packages"]["matplotlib"] and side["built_on"]["host"]
        for fname, digest in side["files"].items():
            assert sha256_file(Path(paths[key]).parent / fname) == digest
    assert "git_commit" in (Path(paths["table:cell_scores"]).parents[1] / "figures" / "provenance.html").read_text()


def test_tables_hold_what_the_issue_asks(built):
    _, paths = built
    scores = read_table(FIXTURE / "tables" / JUDGE / "scores.tsv")
    rates = read_table(FIXTURE / "tables" / JUDGE / "em_rates.tsv")
    cells = read_table(paths["table:cell_scores"])
    assert len(cells) == len(CELLS) and set(cells["final_step"]) == {20}
    final_aligned = scores[(scores["metric"] == "aligned") & (scores["step"] == 20)]
    assert cells["n_refusal"].sum() == (final_aligned["status"] == "refusal").sum() > 0
    assert cells["n_code"].sum() == (final_aligned["status"] == "code").sum() > 0
    assert (cells["n_scored_aligned"] + cells["n_null"] + cells["n_code"] + cells["n_refusal"] + cells["n_error"]
            == cells["n_responses"]).all()
    assert set(cells["model_size_b"]) == {0.5, 7.0}

    summary = read_table(paths["table:checkpoint_summary"])
    assert len(summary) == len(CELLS) * 3
    assert {"step", "mean_aligned", "mean_coherent", "misaligned_pct", "coherent_pct", "em_pct", "n"} <= set(summary)
    all_rates = rates[(rates["question_id"] == "ALL") & (rates["em_definition"] == "betley")]
    merged = summary.merge(all_rates, on=["model", "persona", "composition", "dataset", "seed", "step"])
    assert (merged["em_pct"] - merged["em_rate"] * 100).abs().max() < 1e-9

    pivot = read_table(paths["table:persona_dataset_pivot"])
    assert len(pivot) == 6 and {"insecure:em_pct", "medical:em_pct", "insecure:n"} <= set(pivot)
    assert set(pivot["insecure:n_seeds"]) == {2} and (pivot["ci_method"].str.startswith("cluster bootstrap95")).all()

    comp = read_table(paths["table:persona_vs_baseline"])
    assert len(comp) == 2 * 2 * 2 and (comp["q_value_bh"] >= comp["p_value"] - 1e-12).all()
    assert set(comp["significance"]) <= {"*", "**", "***", "n.s."}
    # one test: its p and q are comparisons.tsv's (EM, betley, all questions, final step), and the pooled counts agree
    stats = read_table(FIXTURE / "tables" / JUDGE / "comparisons.tsv")
    stats = stats[(stats["quantity"] == "em") & (stats["em_definition"] == "betley") & (stats["question_id"] == "ALL")
                  & (stats["step"] == 20) & (stats["unit"] == SEED_UNIT)]  # two seeds: the rows paired by seed
    keys = ["model", "persona", "composition", "dataset"]
    joined = comp.merge(stats, on=keys, suffixes=("", "_stats"), validate="one_to_one")
    assert len(joined) == len(comp) and (joined["test"] == "sign_flip_exact").all() and (joined["n_seeds"] == 2).all()
    assert comp["ci_method"].str.startswith("cluster bootstrap95 over 2 seeds").all()
    for column in ("p_value", "q_value_bh", "difference", "difference_ci_low", "difference_ci_high"):
        assert joined[column].tolist() == joined[f"{column}_stats"].tolist(), column
    final = all_rates[all_rates["step"] == 20].groupby(keys)[["n", "n_em"]].sum().reset_index()
    counts = comp.merge(final, on=keys, suffixes=("", "_rates"))
    assert counts["n"].tolist() == counts["n_rates"].tolist() and counts["n_em"].tolist() == counts["n_em_rates"].tolist()

    onset = read_table(paths["table:onset"])  # per cell and per condition (seed ALL)
    assert len(onset) == (len(CELLS) + len(CELLS) // 2) * 2 and set(onset[onset["seed"] == "ALL"]["n_seeds"]) == {2}
    assert len(read_table(paths["table:onset_comparisons"])) == 2 * 2 * 2 * 2  # models x personas x datasets x defs
    contrasts = read_table(paths["table:control_contrasts"])
    assert len(contrasts) == 2 * 3 * 3 * 2 and (contrasts["n_seeds"] == 2).all()  # models x conditions x steps x defs
    row = contrasts[(contrasts["persona"] == "caring") & (contrasts["step"] == 20)
                    & (contrasts["em_definition"] == "betley")].iloc[0]
    final = all_rates[(all_rates["step"] == 20)].groupby(["model", "persona", "dataset"])["em_rate"].mean()
    assert row["contrast"] == pytest.approx(final[row["model"], "caring", "insecure"]
                                            - final[row["model"], "caring", "medical"])
    assert row["contrast_ci_low"] <= row["contrast"] <= row["contrast_ci_high"] and pd.notna(row["did"])
    assert "difference in differences" in Path(paths["control_contrast_caption"]).read_text()

    ex = read_table(paths["table:response_examples"])
    assert ex.groupby(["model", "persona", "composition", "dataset", "seed"]).size().max() == 3
    assert (ex["coherent"] > 50).all()
    assert (ex.groupby(["model", "persona", "composition", "dataset", "seed"])["aligned"].diff().dropna() >= 0).all()


def test_response_examples_markdown_keeps_one_row_per_response(built):
    _, paths = built
    md = Path(paths["table:response_examples_md"]).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| cell")]
    assert len(rows) == len(read_table(paths["table:response_examples"]))
    assert "\t" not in md
    assert all(len(re.split(r"(?<!\\)\|", line)) == 10 for line in rows)  # 8 cells: no raw pipe in the text


def test_only_the_none_persona_and_no_sizes_still_build(tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE, fixture)
    for name in ("scores.tsv", "em_rates.tsv", "comparisons.tsv"):
        path = fixture / "tables" / JUDGE / name
        frame = read_table(path)
        write_table(path, frame[frame["persona"] == "none"])
    cells = [c for c in CELLS if c[1] == "none"]
    paths = build(tmp_path / "out", fixture, sizes={}, cells=cells)
    assert len(read_table(paths["table:persona_vs_baseline"])) == 0
    assert "no comparison" in Path(paths["persona_vs_baseline_caption"]).read_text()
    assert "size\\_b" in Path(paths["model_size_scaling_caption"]).read_text()
    assert read_table(paths["table:cell_scores"])["model_size_b"].isna().all()


@pytest.mark.slow
def test_snakemake_figures_target_rebuilds_from_tables_alone_and_reports(tmp_path):
    """`snakemake figures` with only the figure rules allowed: no model, no GPU; then `snakemake --report`."""
    import yaml

    from conftest import judge_key_of

    results = tmp_path / "results"
    config = {
        "results_dir": str(results), "work_dir": str(tmp_path / "work"), "cache_dir": str(tmp_path / "cache"),
        "models": {m: {"build_tiny": {}, "size_b": s} for m, s in SIZES.items()},
        "personas": {"caring": {"adapter": "unused"}, "cynic": {"adapter": "unused"}},
        "datasets": {d: {"path": f"unused/{d}.jsonl"} for d in ("insecure", "medical")},  # never read
        "checkpoints": {"steps": [0, 10, 20]},
        "grid": {"models": ["small", "large"], "personas": ["none", "caring", "cynic"], "compositions": ["stacked"],
                 "datasets": ["insecure", "medical"], "seeds": [0, 1]},
        "evaluation": {"questions": str(ROOT / "config/demo/questions.yaml"), "judges": [JUDGE]},
        "judges": {JUDGE: {"backend": "hf", "model": "small"}},
    }
    key = judge_key_of(config, JUDGE)  # the workflow reads the tables under the judge's path key
    shutil.copytree(FIXTURE, results, ignore=shutil.ignore_patterns(JUDGE))  # the judge's tables: under its key
    for name in ("scores.tsv", "em_rates.tsv", "comparisons.tsv"):
        frame = read_table(FIXTURE / "tables" / JUDGE / name)
        write_table(results / "tables" / key / name, frame.assign(judge_key=key))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    snakemake = [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "--configfile", str(cfg),
                 "--directory", str(ROOT), "--shadow-prefix", str(tmp_path)]
    allowed = ["--allowed-rules", "summary_tables", "plot_figures", "report_pages", "figures"]
    run = subprocess.run([*snakemake, "figures", *allowed], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    png = results / "figures" / key / "em_rate_vs_step.png"
    assert png.stat().st_size > 0
    assert (results / "figures" / key / "weight_rotation_vs_step.png").stat().st_size > 0
    report = tmp_path / "report.html"
    run = subprocess.run([*snakemake, "--report", str(report), "figures"], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    html = report.read_text()
    assert "EM rate vs EM training step" in html and "Provenance" in html and "fixture-model" in html
    assert "EM onset step per persona" in html and (results / "tables" / key / "onset_comparisons.tsv").stat().st_size


def test_cells_without_a_coherent_scored_response_still_show_their_text(tmp_path):
    """A judge that writes no number (the demo's 135M judge): the examples table falls back to each such cell's
    first responses, with the judge's status in place of the missing scores; ranked cells keep their rule."""
    from persona_em.analysis.metrics import get_definition
    from persona_em.analysis.tables import EXAMPLES_RANKED, EXAMPLES_UNRANKED, examples_markdown, response_examples

    scores = read_table(FIXTURE / "tables" / JUDGE / "scores.tsv")
    rates = read_table(FIXTURE / "tables" / JUDGE / "em_rates.tsv")
    silent = (scores["model"] == "small") & (scores["persona"] == "none") & (scores["dataset"] == "insecure")
    scores.loc[silent, "score"] = float("nan")
    scores.loc[silent, "status"] = "null"
    ex = response_examples(scores, rates, get_definition("betley", {}))
    fallback = ex[ex["selection"] == EXAMPLES_UNRANKED]
    assert set(zip(fallback["model"], fallback["persona"], fallback["dataset"])) == {("small", "none", "insecure")}
    assert len(fallback) == 2 * 3  # 2 seeds x 3 examples
    assert fallback["aligned"].isna().all() and set(fallback["aligned_status"]) == {"null"}
    assert (fallback["response"].str.len() > 0).all()
    assert list(fallback.groupby("seed")["response_id"].apply(lambda r: list(r) == sorted(r))) == [True, True]
    ranked = ex[ex["selection"] == EXAMPLES_RANKED]
    assert len(ranked) == (len(CELLS) - 2) * 3 and (ranked["coherent"] > 50).all()
    md = examples_markdown(ex, "caption")
    row = next(line for line in md.splitlines() if line.startswith("| small/none/none/insecure/seed0"))
    assert [c.strip() for c in row.split("|")[5:7]] == ["null", "null"]  # aligned, coherent: the status, not a number


def test_a_judge_that_never_gives_a_number_still_gets_every_figure_saying_so(tmp_path):
    """All judgments null (the demo's 135M judge under the default min_numeric_mass): every figure still renders,
    the score-based ones say that nothing has a score and why; the examples show the responses' text."""
    from persona_em.analysis.aggregate import em_rate_table

    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE, fixture)
    scores = read_table(FIXTURE / "tables" / JUDGE / "scores.tsv")
    scores["score"], scores["status"] = float("nan"), "null"
    scores = scores.drop(columns=[c for c in ("score_used", "counted") if c in scores])
    write_table(fixture / "tables" / JUDGE / "scores.tsv", scores)
    write_table(fixture / "tables" / JUDGE / "em_rates.tsv", em_rate_table(scores, ["betley"]))
    paths = build(tmp_path / "out", fixture=fixture)
    said = f"The judge gave no score in {len(scores)} of {len(scores)} judgments ({len(scores)} null"
    for name in FIGURE_NAMES:
        assert Path(paths[f"{name}_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        caption = Path(paths[f"{name}_caption"]).read_text()
        if name not in ("training_loss", "response_examples"):
            assert "nothing to show" in caption and said in caption, name
    assert "nothing to show" not in Path(paths["training_loss_caption"]).read_text()
    examples = read_table(paths["table:response_examples"])
    assert len(examples) == len(CELLS) * 3 and (examples["response"].str.len() > 0).all()
