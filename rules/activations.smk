# Inside the model (issue 14): activations of every sampled response at every checkpoint, persona vectors per model
# and persona, persona retention (judge-free), a misalignment direction per judge and model, projections. Requested
# by `rule all` only when analysis.activations is configured (activation_targets); `snakemake activations` builds
# just these; analysis.activations.misalignment_direction: false leaves out the direction (model_directions is
# then empty): the projections on the persona vectors and random controls and their figures run without it. A
# failing analysis job (e.g. too few misaligned responses for a direction) fails alone: the tables and figures of
# rules/report.smk and persona retention do not depend on it.


# Not in a Snakemake group with its cell's `sample` job (issue 14 suggested one to share the GPU allocation): when
# any job of a group job fails, Snakemake removes the outputs of every job of the group (snakemake 9.27
# GroupJob.postprocess(error=True) -> Job.cleanup), so a failing or timed-out collect_activations would delete the
# cell's finished samples, block its judging and tables, and each retry would sample again. Checked on the
# single-node SLURM test cluster with the slurm plugin 2.8.0 (the group's sbatch resources themselves were right:
# -t = the sum of the runtimes, max of mem and cpus, one gpu).
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


rule persona_vectors:
    input:
        model=MODEL,
        source=lambda wc: persona_vector_source(wc)["path"],
    output:
        directory(PERSONA_VECTOR),
    params:
        source=persona_vector_source,
        settings=activation_settings(config),
        template=lambda wc: config["persona_training"]["teacher"]["system_prompt_template"],  # {traits}: not a wildcard
        work=PERSONA_VECTOR_WORK,
    log:
        f"{LOGS}/persona_vectors/{{model}}/{{persona}}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/persona_vectors.py"


rule persona_retention:
    input:
        activations=cell_paths(ACTIVATIONS),
        vectors=persona_vector_dirs,
    output:
        **RETENTION_TABLE_FILES,
    params:
        settings=activation_settings(config),
        n_bootstrap=config["evaluation"]["bootstrap"]["n_resamples"],
    log:
        f"{LOGS}/persona_retention/persona_retention.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/persona_retention.py"


rule persona_retention_figure:
    input:
        retention=RETENTION_TABLE_FILES["persona_retention"],
        em_rates=EM_RATES,
    output:
        **figure_outputs(RETENTION_FIGURE_FILES),
    params:
        definition=config["evaluation"]["figure_em_definition"],
    log:
        f"{LOGS}/persona_retention_figure/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/persona_retention_figure.py"


rule activation_projections:
    input:
        activations=cell_paths(ACTIVATIONS),
        directions=lambda wc: list(model_directions(wc).values()),
        vectors=persona_vector_dirs,
        scores=SCORES,
    output:
        **ACTIVATION_TABLE_FILES,
    params:
        settings=activation_settings(config),
        directions=model_directions,
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
        directions=lambda wc: list(model_directions(wc).values()),
    output:
        **figure_outputs(ACTIVATION_FIGURE_FILES),
    log:
        f"{LOGS}/activation_figures/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/activation_figures.py"


rule activations:
    input:
        activation_targets(),
