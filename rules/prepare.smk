# Base models and EM datasets. Downloads run on the submit host (localrule): compute nodes have no internet.


localrules:
    prepare_model,
    fetch_dataset,
    fetch_questions,
    control_overlap,


rule prepare_model:
    output:
        MODEL,
    params:
        spec=lambda wc: model_source(config, wc.model),
        cache=CACHE,
    log:
        f"{LOGS}/prepare_model/{{model}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/prepare_model.py"


rule make_demo_dataset:
    output:
        DEMO_DATASET,
    params:
        spec=lambda wc: config["datasets"][wc.dataset]["demo"],
    log:
        f"{LOGS}/make_demo_dataset/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/make_demo_dataset.py"


rule fetch_dataset:
    output:
        DOWNLOADED_DATASET,
    params:
        url=lambda wc: config["datasets"][wc.dataset]["url"],
        sha256=lambda wc: config["datasets"][wc.dataset]["sha256"],
    log:
        f"{LOGS}/fetch_dataset/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/fetch_dataset.py"


# The source may be plain or gzip-compressed chat JSONL (persona_em/data/datasets.py reads both); the outputs are plain JSONL.
rule prepare_dataset:
    input:
        dataset_source,
    output:
        train=TRAIN_DATA,
        eval=EVAL_DATA,
        manifest=DATA_MANIFEST,
    params:
        spec=lambda wc: config["datasets"][wc.dataset],
    log:
        f"{LOGS}/prepare_dataset/{{dataset}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/prepare_dataset.py"


# How alike a treatment dataset and its benign control (analysis.controls) are: shared prompts, identical answers
# (persona_em/data/controls.py). Seconds of reading two files: it runs beside the controller.
rule control_overlap:
    input:
        treatment=lambda wc: TRAIN_DATA.format(dataset=wc.treatment),
        control=lambda wc: TRAIN_DATA.format(dataset=wc.control),
    output:
        CONTROL_OVERLAP,
    log:
        f"{LOGS}/control_overlap/{{treatment}}__vs__{{control}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/control_overlap.py"


rule fetch_questions:
    output:
        DOWNLOADED_QUESTIONS,
    params:
        url=lambda wc: config["evaluation"]["questions"]["url"],
    log:
        f"{LOGS}/fetch_questions/{{questions_sha}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/fetch_questions.py"
