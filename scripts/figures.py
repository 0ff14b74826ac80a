from persona_em.figures import make_figures
from persona_em.runner import run


def main(sm):
    make_figures(sm.input.scores, sm.input.em_rates, sm.wildcards.judge, sm.params.definition, dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
