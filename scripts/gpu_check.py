from persona_em.cluster import gpu_smoke
from persona_em.runner import run


def main(sm):
    gpu_smoke(sm.params.gpus, sm.output[0])


run(snakemake, main)  # noqa: F821
