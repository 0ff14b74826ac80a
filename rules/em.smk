# EM LoRA fine-tuning of each cell, on top of the persona as the cell's composition says.


rule train_em:
    input:
        model=MODEL,
        train=TRAIN_DATA,
        persona=persona_adapter,
    output:
        checkpoints=directory(CHECKPOINTS),
        log_table=TRAIN_LOG,
    params:
        settings=lambda wc: train_settings(config, cell_of(wc)),
        schedule=lambda wc: checkpoint_spec(config, cell_of(wc)),
        work=TRAIN_WORK,
    log:
        f"{LOGS}/train_em/{CELL}.log",
    threads: 8
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/train_em.py"
