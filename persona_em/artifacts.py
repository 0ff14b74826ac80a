"""Every output the workflow publishes and what it holds: the one list of tables and figures.

rules/common.smk turns the names into paths; README "Outputs" is generated from this module:

    .venv/bin/python -m persona_em.artifacts      # rewrites the marked block of README.md

and tests/test_artifacts.py fails when the README, the workflow's table paths and this module disagree.
"""
from __future__ import annotations

import re
from pathlib import Path

# The tidy tables of one judge path key (rule aggregate): results/tables/{judge}/<name>.tsv
JUDGE_TABLES = {
    "scores": "the tidy long table: one row per (response, metric)",
    "em_rates": "EM rate per (cell, step, question or `ALL`, EM definition) with a Wilson 95% CI",
    "summary": "per (cell, step, question or `ALL`, metric): mean score with a seeded bootstrap CI; scored / null / "
               "code / refusal / error rates with Wilson CIs",
    "label_rates": "label questions (`free_form_judge`): per (cell, step, question or `ALL`, metric, label): count, "
                   "rate among the judgments with a label, Wilson 95% CI, and the group's null and error counts",
    "seeds": "across training seeds: mean, SD and CI of EM rates (cluster bootstrap: seeds, then responses within "
             "question) and mean scores (resampling seeds); with one seed, CIs over responses (`ci_unit`)",
    "comparisons": "persona vs baseline (same model, dataset, step; per question and overall): difference in means "
                   "with its bootstrap CI, permutation-test p, Cohen's d, Benjamini-Hochberg q (the one test: README "
                   "\"Judging and statistics\")",
}
# Summary tables rebuilt from the tidy tables (rule summary_tables): results/tables/{judge}/<name>.tsv, each with a
# <name>.provenance.json sidecar
SUMMARY_TABLES = {
    "cell_scores": "one row per cell at its final step: mean/SD alignment and coherence, n scored / null / code / "
                   "refusal, EM rate with its Wilson CI",
    "checkpoint_summary": "one row per cell and step: mean aligned, mean coherent, misaligned %, coherent %, EM %, n",
    "persona_dataset_pivot": "final EM %: rows model / persona / composition, columns per dataset (mean over seeds "
                             "with a cluster-bootstrap CI; with one seed, Wilson)",
    "persona_vs_baseline": "the final-step EM rows of `comparisons.tsv` (figure's EM definition, all questions; "
                           "paired by seed with >= 2 seeds) with both rates' CIs and significance marks",
    "response_examples": "the lowest-aligned coherent responses of each cell at its final step (also as "
                         "`response_examples.md`)",
    "onset": "EM onset per cell and per condition (seed `ALL`) and EM definition: the first step where the EM rate "
             "reaches `analysis.onset.threshold`, interpolated between checkpoints; censored rows kept; CI over seeds "
             "(over responses with one seed, `ci_unit`)",
    "onset_comparisons": "persona - baseline onset, paired by seed: difference with its CI, sign-flip permutation p, "
                         "Benjamini-Hochberg q",
    "control_contrasts": "per benign-control pair of `analysis.controls`, model, persona, composition, step: "
                         "EM(treatment) - EM(control) and the difference-in-differences against the no-persona "
                         "baseline, with CIs (cluster bootstrap over seeds; over responses with one seed, `ci_unit`)",
}
# Figures (rule plot_figures): results/figures/{judge}/<name>.{png,svg} + .caption.rst + .provenance.json
FIGURES = {
    "em_rate_vs_step": "EM rate vs EM training step per model and dataset, one line per persona (band over seeds)",
    "final_em_by_domain_size": "final EM rate by dataset and model size, seeds pooled, Wilson CIs",
    "model_size_scaling": "final EM rate vs model size (`models.<name>.size_b`)",
    "alignment_vs_coherence": "alignment vs coherence of every response at the final step, with the thresholds",
    "question_heatmap": "EM rate per question at the final step",
    "persona_vs_baseline": "final EM rate of each persona next to the baseline, marks from `persona_vs_baseline.tsv`",
    "alignment_violin": "alignment score distributions at step 0 (control) and at the final step",
    "alignment_cdf": "cumulative distribution of alignment scores, step 0 and final step",
    "training_loss": "EM training loss per cell (from each cell's `train_log.tsv`)",
    "response_examples": "the lowest-aligned coherent responses per cell as an image",
    "onset": "EM onset step per persona with CIs (censored conditions marked), from `onset.tsv`",
    "control_contrast": "EM(treatment) - EM(control) at the final step per persona with CIs, from "
                        "`control_contrasts.tsv`",
}
# Inside the model (rules/activations.smk, only with `analysis.activations`). Judge-keyed (they use the judge's labels
# or its EM rates): results/tables/{judge}/<name>.tsv and results/figures/{judge}/<name>.{png,svg} + .caption.rst +
# .provenance.json. Built with or without the misalignment direction (analysis.activations.misalignment_direction):
# without it there are no `misalignment` rows and its two figures say why they are empty.
ACTIVATION_TABLES = {
    "activation_projections": "one row per (response, reader, direction, layer): the projection of the response's "
                              "activation on each persona vector (`persona:<name>`), on random control directions "
                              "and, when it is built, on the unit misalignment direction (cross-fitted), with the "
                              "judge's labels",
    "activation_summary": "per (cell, step, reader, direction, layer): mean projection with a bootstrap CI over "
                          "seeds, and the AUROC of the projection against the judge's misaligned / aligned labels "
                          "(`auroc_status`: computed, or why not, e.g. no labelled response)",
}
ACTIVATION_FIGURES = {
    "persona_projection_vs_step": "mean projection on each persona vector vs EM training step, one line per persona "
                                  "(band over seeds; dotted: random controls), and its AUROC against the judge's "
                                  "labels (or why there is none)",
    "misalignment_projection_vs_step": "mean projection on the misalignment direction vs EM training step, one line "
                                       "per persona (band over seeds); without a direction, why",
    "direction_auroc_by_layer": "held-out AUROC of the misalignment direction per layer, the chosen layer marked; "
                                "without a direction, why",
}
# Weight trajectories of one cell (rule weight_norms; no judge): results/tables/weights/{cell}/<name>.tsv, each with a
# <name>.provenance.json sidecar (persona_em/analysis/weights.py)
WEIGHT_TABLES = {
    "weight_norms": "per snapshot step, layer and module: Frobenius norm of the EM update s·B·A, the persona's, "
                    "their inner product and cosine, the model's total update (persona + EM with the cross term)",
    "weight_rotation": "per snapshot step, layer and module: inner products and angle to the previous snapshot's "
                       "EM update and cosine to the final one; B-vector angle and cosine for rank-1 adapters",
}
# Figures of the weight tables (rule plot_figures, with the judge's EM rate): results/figures/{judge}/<name>.{png,svg}
WEIGHT_FIGURES = {
    "weight_norms_vs_step": "EM update norm per layer group vs step, one line per persona (dashed: persona + EM)",
    "weight_rotation_vs_step": "angle between consecutive EM updates (and rank-1 B vectors) vs step, EM rate on a "
                               "second axis",
}
RETENTION_FIGURES = {
    "persona_retention_vs_step": "persona retention R(t) on each persona vector vs step, next to the judge's EM rate "
                                 "vs step (the headline)",
}
# Judge-free (no judge label is used): results/tables/activations/<name>.tsv
RETENTION_TABLES = {
    "persona_retention": "per (persona vector, cell, step, layer): persona retention R(t) = (p_t - p_none,0) / "
                         "(p_persona,0 - p_none,0) of the cell's own activations on the persona vector, mean over "
                         "seeds with a bootstrap CI; no judge involved",
}
TABLE_NAMES = tuple(SUMMARY_TABLES)
WEIGHT_TABLE_NAMES = tuple(WEIGHT_TABLES)
WEIGHT_FIGURE_NAMES = tuple(WEIGHT_FIGURES)
FIGURE_NAMES = tuple(FIGURES)
# The files of each figure: kind -> file suffix (caption: RST that `snakemake --report` includes; provenance: JSON sidecar)
FIGURE_SUFFIXES = {"png": "png", "svg": "svg", "caption": "caption.rst", "provenance": "provenance.json"}

# Every published path (under results_dir) in README order; the table and figure rows come from the dicts above.
OUTPUTS = [
    ("models/{model}/model.json", "where the base model lives (and its source), its chat settings"),
    ("data/{dataset}/train.jsonl`, `eval.jsonl`, `manifest.json",
     "validated data, the seeded split and its record (sha256, indices)"),
    ("data/controls/{treatment}__vs__{control}.json", "per `analysis.controls` pair, from the training splits: "
     "the fraction of the treatment's prompts that occur in the control and of the control's assistant turns "
     "identical to treatment turns"),
    ("persona_data/{persona}/`, `personas/{model}/{persona}/",
     "the persona arm's prompts, answers, pairs (+ drop stats) and adapters (see \"Personas from a constitution\")"),
    ("em/{cell}/checkpoints/step-NNNNNN/", "the EM adapter at each scheduled step; `checkpoints.json` records the "
     "schedule, the training settings and the adapters active in training"),
    ("em/{cell}/train_log.tsv", "per optimizer step: loss, learning rate, grad norm, tokens"),
    *((f"tables/weights/{{cell}}/{name}.tsv", f"{text}; sidecar `{name}.provenance.json`")
      for name, text in WEIGHT_TABLES.items()),
    ("samples/{cell}.jsonl", "one row per response: cell keys, step, question id, paraphrase, sample index, text, "
     "generation settings, active adapters, the host and GPU that generated it"),
    ("judged/{judge}/{cell}.jsonl", "one row per (response, metric): score 0–100 or null (or a label, for label "
     "questions), status (scored / null / code / refusal / error), numeric and CODE / REFUSAL mass, raw top logprobs, judge identity (name, key, model, mode, "
     "prompt hash)"),
    ("tables/{judge}/judge.json", "what the key means: the judge's name, key and the identity its hash covers"),
    *((f"tables/{{judge}}/{name}.tsv", text) for name, text in JUDGE_TABLES.items()),
    ("tables/agreement/{a}__vs__{b}.tsv",
     "two judges on the same responses (only for pairs in `evaluation.judge_agreement`), over all of them (`cell` "
     "`ALL`) and per grid cell: score correlations (Spearman rho), Cohen's kappa of the EM labels"),
    ("figures/agreement/{a}__vs__{b}.html", "the same table as a page of `snakemake --report` (category Judge "
     "agreement)"),
    *((f"tables/{{judge}}/{name}.tsv", f"{text}; sidecar `{name}.provenance.json`")
      for name, text in SUMMARY_TABLES.items()),
    *((f"figures/{{judge}}/{name}.png`, `.svg", f"{text}; `.caption.rst`, `.provenance.json`")
      for name, text in {**FIGURES, **WEIGHT_FIGURES}.items()),
    ("activations/{cell}/", "with `analysis.activations`: per response x reader (own model, base model) the mean "
     "over response tokens and the last prompt token's state at the configured layers (`activations.safetensors`, "
     "fp16), `index.tsv` (row keys), `meta.json`"),
    ("directions/{judge}/{model}/", "the misalignment direction per layer and cross-fitting fold "
     "(`direction.safetensors`), held-out AUROC per layer (`layers.tsv`), the chosen layer (`direction.json`)"),
    ("persona_vectors/{model}/{persona}/", "with `analysis.activations`: the persona vector per layer "
     "(`vector.safetensors`), held-out Cohen's d and AUROC per layer and the chosen layer (`layers.tsv`), the base "
     "model's rollouts with and without the persona's system prompt and their extract / evaluate split "
     "(`rollouts.jsonl`), its source and settings (`vector.json`)"),
    *((f"tables/activations/{name}.tsv", text) for name, text in RETENTION_TABLES.items()),
    *((f"tables/{{judge}}/{name}.tsv", text) for name, text in ACTIVATION_TABLES.items()),
    *((f"figures/{{judge}}/{name}.png`, `.svg", f"{text}; `.caption.rst`, `.provenance.json`")
      for name, text in {**ACTIVATION_FIGURES, **RETENTION_FIGURES}.items()),
    ("figures/{judge}/summary_tables.html`, `provenance.html", "the summary tables and every artifact's provenance "
     "as pages of `snakemake --report`"),
    ("logs/{rule}/...log", "one log per job: what was resumed, what was skipped, progress bars"),
]
BEGIN = "<!-- outputs: generated from persona_em/artifacts.py by `python -m persona_em.artifacts`; do not edit -->"
END = "<!-- end of outputs -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def outputs_markdown() -> str:
    """The README's table of every published output (unpadded rows: DataFrame.to_markdown would pad every cell to
    the widest one, 280-character lines in the README's source; the texts are this module's own, with no `|`)."""
    assert not any("|" in path + text for path, text in OUTPUTS)
    rows = ["| path (under `results_dir`) | content |", "| --- | --- |"]
    return "\n".join(rows + [f"| `{path}` | {text} |" for path, text in OUTPUTS])


def readme_with_outputs(readme: str) -> str:
    """`readme` with the block between BEGIN and END replaced by outputs_markdown()."""
    block = re.compile(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END), re.S)
    if len(block.findall(readme)) != 1:
        raise SystemExit(f"README.md: expected one block from {BEGIN!r} to {END!r}")
    return block.sub(lambda _: f"{BEGIN}\n{outputs_markdown()}\n{END}", readme)


if __name__ == "__main__":
    README.write_text(readme_with_outputs(README.read_text()))
    print(f"updated the outputs block of {README}")
