# Summary tables, figures and report pages, rebuilt from the tidy tables alone (no model, no GPU).
# `snakemake figures` builds them all; see README "Figures and report".


rule summary_tables:
    input:
        scores=SCORES,
        em_rates=EM_RATES,
        comparisons=COMPARISONS,
    output:
        **SUMMARY_TABLES,
        **TABLE_SIDECARS,
        response_examples_md=RESPONSE_EXAMPLES_MD,
    params:
        definition=config["evaluation"]["figure_em_definition"],
        custom=config["evaluation"]["custom_em_definitions"],
        sizes=MODEL_SIZES,
        repo=workflow.basedir,
    log:
        f"{LOGS}/summary_tables/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/tables.py"


rule plot_figures:
    input:
        scores=SCORES,
        em_rates=EM_RATES,
        train_logs=train_logs,
        comparisons=SUMMARY_TABLES["persona_vs_baseline"],
        examples=SUMMARY_TABLES["response_examples"],
        onset=SUMMARY_TABLES["onset"],
        controls=SUMMARY_TABLES["control_contrasts"],
        weight_norms=weight_tables("weight_norms"),
        weight_rotation=weight_tables("weight_rotation"),
    output:
        **figure_outputs(),
    params:
        definition=config["evaluation"]["figure_em_definition"],
        custom=config["evaluation"]["custom_em_definitions"],
        sizes=MODEL_SIZES,
        repo=workflow.basedir,
    log:
        f"{LOGS}/plot_figures/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/figures.py"


rule report_pages:
    input:
        tables=list(SUMMARY_TABLES.values()),
        sidecars=[
            *TABLE_SIDECARS.values(),
            *(FIGURE_FILES[f"{n}_provenance"] for n in FIGURE_NAMES),
            *(WEIGHT_FIGURE_FILES[f"{n}_provenance"] for n in WEIGHT_FIGURE_NAMES),
        ],
    output:
        tables=report(TABLES_PAGE, caption="../report/summary_tables.rst", category="Tables", subcategory="{judge}"),
        provenance=report(
            PROVENANCE_PAGE, caption="../report/provenance.rst", category="Provenance", subcategory="{judge}"
        ),
    log:
        f"{LOGS}/report_pages/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/report_pages.py"


rule figures:
    input:
        figure_targets(),
        activation_figure_targets(),
