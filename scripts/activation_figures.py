from persona_em.reporting.activation_figures import make_activation_figures
from persona_em.runner import run


def main(sm):
    make_activation_figures(sm.input.summary, list(sm.input.directions), dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
