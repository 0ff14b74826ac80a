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


rule activations:
    input:
        activation_targets(),
