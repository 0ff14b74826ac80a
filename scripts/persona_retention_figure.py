from persona_em.reporting.activation_figures import make_retention_figure
from persona_em.runner import run


def main(sm):
    make_retention_figure(sm.input.retention, sm.input.em_rates, sm.params.definition, dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
