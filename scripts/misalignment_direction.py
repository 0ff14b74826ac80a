from persona_em.activations.direction import misalignment_direction
from persona_em.runner import run


def main(sm):
    misalignment_direction(list(sm.input.activations), sm.input.scores, sm.params.settings, sm.wildcards.judge,
                           sm.wildcards.model, sm.output[0])


run(snakemake, main)  # noqa: F821
