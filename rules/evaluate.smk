# Sampling every checkpoint, judging every response, and the tidy tables (one judge per table). {judge} is a judge's
# path key (rules/common.smk JUDGE_KEYS); judge_name / judge_settings look its config up.


rule sample:
    input:
        model=MODEL,
        persona=persona_adapter,
        checkpoints=CHECKPOINTS,
        questions=QUESTIONS,
    output:
        SAMPLES,
    params:
        settings=lambda wc: sampling_settings(config, cell_of(wc)),
        journal=SAMPLE_JOURNAL,
        compile_cache=COMPILE_CACHE,
    log:
        f"{LOGS}/sample/{CELL}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/sample.py"


localrules:
    judge_api,


# A local (hf) judge: a job on a compute node (GPU).
rule judge:
    input:
        samples=SAMPLES,
        questions=QUESTIONS,
        judge_model=judge_model,
    output:
        JUDGED,
    wildcard_constraints:
        judge=LOCAL_JUDGES,
    params:
        judge=judge_settings,
        name=judge_name,
        journal=JUDGE_JOURNAL,
        cache=JUDGE_CACHE,
    log:
        f"{LOGS}/judge/{{judge}}/{CELL}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/judge.py"


# An OpenAI-compatible judge: the same job on the submit host, which has the internet (compute nodes do not).
use rule judge as judge_api with:
    wildcard_constraints:
        judge=API_JUDGES,


rule aggregate:
    input:
        judged_files,
    output:
        scores=SCORES,
        em_rates=EM_RATES,
        summary=SUMMARY,
        seeds=SEED_SUMMARY,
        comparisons=COMPARISONS,
        label_rates=LABEL_RATES,
        identity=JUDGE_IDENTITY,
    params:
        identity=judge_key_record,
        definitions=config["evaluation"]["em_definitions"],
        custom=config["evaluation"]["custom_em_definitions"],
        policy=config["evaluation"]["score_policy"],
        n_bootstrap=config["evaluation"]["bootstrap"]["n_resamples"],
        bootstrap_seed=config["evaluation"]["bootstrap"]["seed"],
    log:
        f"{LOGS}/aggregate/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/aggregate.py"


rule judge_agreement:
    input:
        scores_a=SCORES.replace("{judge}", "{judge_a}"),
        scores_b=SCORES.replace("{judge}", "{judge_b}"),
    output:
        table=JUDGE_AGREEMENT,
        page=report(AGREEMENT_PAGE, caption="../report/judge_agreement.rst", category="Judge agreement"),
    params:
        definitions=config["evaluation"]["em_definitions"],
        custom=config["evaluation"]["custom_em_definitions"],
    log:
        f"{LOGS}/judge_agreement/{{judge_a}}__vs__{{judge_b}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/judge_agreement.py"
