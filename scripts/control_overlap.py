from persona_em.data.controls import control_overlap
from persona_em.runner import run


def main(sm):
    control_overlap(sm.wildcards.treatment, sm.wildcards.control, sm.input.treatment, sm.input.control, sm.output[0])


run(snakemake, main)  # noqa: F821
