# The persona arm: constitution -> prompts -> teacher/student answers -> DPO pairs -> DPO persona LoRA, and hub
# personas. Each persona with a constitution is trained once per base model of the grid; persona_adapter
# (rules/common.smk) plugs the result into the EM grid.


localrules:
    fetch_hub_persona,
    expand_prompts_api,
    teacher_api,


rule fetch_hub_persona:
    output:
        directory(HUB_PERSONA),
    params:
        spec=lambda wc: config["personas"][wc.persona],
        cache=CACHE,
    log:
        f"{LOGS}/fetch_hub_persona/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/fetch_hub_persona.py"


rule expand_prompts:
    input:
        constitution=constitution_file,
        generator_model=persona_generator_model("expand"),
    output:
        PERSONA_PROMPTS,
    wildcard_constraints:
        persona=LOCAL_EXPAND_PERSONAS,
    params:
        generator=persona_generator("expand"),
        settings=lambda wc: config["persona_training"]["expand"],
        journal=PERSONA_PROMPTS_JOURNAL,
    log:
        f"{LOGS}/expand_prompts/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/expand_prompts.py"


# A local (hf) teacher such as GLM-4.5-Air spans all GPUs of one node (device_map="auto"): the profile gives this
# rule 4 GPUs. An API teacher needs none.
rule teacher:
    input:
        constitution=constitution_file,
        prompts=PERSONA_PROMPTS,
        generator_model=persona_generator_model("teacher"),
    output:
        TEACHER_RESPONSES,
    wildcard_constraints:
        persona=LOCAL_TEACHER_PERSONAS,
    params:
        generator=persona_generator("teacher"),
        settings=lambda wc: config["persona_training"]["teacher"],
        journal=TEACHER_JOURNAL,
    log:
        f"{LOGS}/teacher/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/teacher.py"


# API generators need the internet: the same stages on the submit host.
use rule expand_prompts as expand_prompts_api with:
    wildcard_constraints:
        persona=API_EXPAND_PERSONAS,


use rule teacher as teacher_api with:
    wildcard_constraints:
        persona=API_TEACHER_PERSONAS,


rule student:
    input:
        constitution=constitution_file,
        prompts=PERSONA_PROMPTS,
        model=MODEL,
    output:
        STUDENT_RESPONSES,
    params:
        settings=lambda wc: {**config["persona_training"]["student"],
                             "samples_per_prompt": config["persona_training"]["teacher"]["samples_per_prompt"]},
        journal=STUDENT_JOURNAL,
    log:
        f"{LOGS}/student/{{model}}/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/student.py"


rule dpo_pairs:
    input:
        teacher=TEACHER_RESPONSES,
        student=STUDENT_RESPONSES,
        model=MODEL,
    output:
        pairs=DPO_PAIRS,
        stats=DPO_PAIR_STATS,
    params:
        settings=lambda wc: config["persona_training"]["pairs"],
    log:
        f"{LOGS}/dpo_pairs/{{model}}/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/dpo_pairs.py"


rule train_dpo:
    input:
        model=MODEL,
        pairs=DPO_PAIRS,
    output:
        directory(DPO_ADAPTER),
    params:
        settings=lambda wc: config["persona_training"]["dpo"],
        work=DPO_WORK,
    log:
        f"{LOGS}/train_dpo/{{model}}/{{persona}}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/train_dpo.py"


rule introspection:
    input:
        constitution=constitution_file,
        model=MODEL,
        dpo_adapter=DPO_ADAPTER,
    output:
        INTROSPECTION,
    params:
        settings=lambda wc: {**config["persona_training"]["introspection"],
                             "system_prompt_template": config["persona_training"]["teacher"]["system_prompt_template"]},
        journal=INTROSPECTION_JOURNAL,
    log:
        f"{LOGS}/introspection/{{model}}/{{persona}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/introspection.py"


rule train_sft:
    input:
        model=MODEL,
        dpo_adapter=DPO_ADAPTER,
        data=INTROSPECTION,
    output:
        directory(PERSONA_FINAL),
    params:
        settings=lambda wc: config["persona_training"]["sft"],
        work=SFT_WORK,
    log:
        f"{LOGS}/train_sft/{{model}}/{{persona}}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/train_sft.py"
