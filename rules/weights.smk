# Weight trajectories of each cell's EM LoRA (CPU): update norms and rotation at every checkpoint and trace snapshot.


rule weight_norms:
    input:
        checkpoints=CHECKPOINTS,
        persona=persona_adapter,
    output:
        **WEIGHT_TABLE_FILES,
        **WEIGHT_TABLE_SIDECARS,
    params:
        repo=workflow.basedir,
    log:
        f"{LOGS}/weight_norms/{CELL}.log",
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/weight_norms.py"
