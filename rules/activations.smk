# Inside the model (issue 14): activations of every sampled response at every checkpoint, a misalignment direction
# per judge and model, projections. Requested by `rule all` only when analysis.activations is configured
# (activation_targets); `snakemake activations` builds just these. A failing analysis job (e.g. too few misaligned
# responses for a direction) fails alone: the tables and figures of rules/report.smk do not depend on it.


rule collect_activations:
    input:
        model=MODEL,
        persona=persona_adapter,
        checkpoints=CHECKPOINTS,
        samples=SAMPLES,
        questions=QUESTIONS,
    output:
        directory(ACTIVATIONS),
    params:
        settings=lambda wc: {k: activation_settings(config)[k] for k in ("layers", "batch_tokens")},
        work=ACTIVATION_WORK,
    log:
        f"{LOGS}/collect_activations/{CELL}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/collect_activations.py"


rule misalignment_direction:
    input:
        activations=model_activations,
        scores=SCORES,
    output:
        directory(MISALIGNMENT_DIRECTION),
    params:
        settings=activation_settings(config),
    log:
        f"{LOGS}/misalignment_direction/{{judge}}/{{model}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/misalignment_direction.py"


rule activation_projections:
    input:
        activations=cell_paths(ACTIVATIONS),
        directions=lambda wc: list(model_directions(wc).values()),
        scores=SCORES,
        em_rates=EM_RATES,
    output:
        **ACTIVATION_TABLE_FILES,
    params:
        settings=activation_settings(config),
        directions=model_directions,
        definition=config["evaluation"]["figure_em_definition"],
        n_bootstrap=config["evaluation"]["bootstrap"]["n_resamples"],
    log:
        f"{LOGS}/activation_projections/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/activation_projections.py"


rule activation_figures:
    input:
        summary=ACTIVATION_TABLE_FILES["activation_summary"],
        retention=ACTIVATION_TABLE_FILES["persona_retention"],
        directions=lambda wc: list(model_directions(wc).values()),
    output:
        **ACTIVATION_FIGURE_FILES,
    log:
        f"{LOGS}/activation_figures/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/activation_figures.py"


rule activations:
    input:
        activation_targets(),
