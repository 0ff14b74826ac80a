# Cluster checks: `snakemake --profile profiles/leonardo gpu_smoke` submits one job per GPU count the workflow uses
# and fails unless each job sees exactly the GPUs it asked for.


rule gpu_smoke:
    input:
        expand(GPU_SMOKE, gpus=[1, 4]),


rule gpu_check:
    output:
        GPU_SMOKE,
    params:
        gpus=lambda wc: int(wc.gpus),
    log:
        f"{LOGS}/gpu_check/gpus{{gpus}}.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/gpu_check.py"
