"""Names of the figures and summary tables built from the tidy tables (rules/common.smk turns them into paths)."""

FIGURE_NAMES = (
    "em_rate_vs_step",
    "final_em_by_domain_size",
    "model_size_scaling",
    "alignment_vs_coherence",
    "question_heatmap",
    "persona_vs_baseline",
    "alignment_violin",
    "alignment_cdf",
    "training_loss",
    "response_examples",
)
# The files of each figure: kind -> file suffix (caption: RST that `snakemake --report` includes; provenance: JSON sidecar)
FIGURE_SUFFIXES = {"png": "png", "svg": "svg", "caption": "caption.rst", "provenance": "provenance.json"}
TABLE_NAMES = ("cell_scores", "checkpoint_summary", "persona_dataset_pivot", "persona_vs_baseline", "response_examples")
