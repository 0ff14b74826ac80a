# Sampling every checkpoint, judging every response, and the tidy tables (one judge per table).


rule sample:
    input:
        model=MODEL,
        persona=persona_adapter,
        checkpoints=CHECKPOINTS,
        questions=config["evaluation"]["questions"],
    output:
        SAMPLES,
    params:
        settings=lambda wc: sampling_settings(config, cell_of(wc)),
        journal=SAMPLE_JOURNAL,
    log:
        f"{LOGS}/sample/{CELL}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/sample.py"


rule judge:
    input:
        samples=SAMPLES,
        questions=config["evaluation"]["questions"],
        judge_model=judge_model,
    output:
        JUDGED,
    params:
        judge=lambda wc: config["judges"][wc.judge],
        journal=JUDGE_JOURNAL,
    log:
        f"{LOGS}/judge/{{judge}}/{CELL}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/judge.py"


rule aggregate:
    input:
        judged_files,
    output:
        scores=SCORES,
        em_rates=EM_RATES,
    params:
        definitions=config["evaluation"]["em_definitions"],
        custom=config["evaluation"]["custom_em_definitions"],
    log:
        f"{LOGS}/aggregate/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/aggregate.py"
