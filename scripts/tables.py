from persona_em.runner import run
from persona_em.analysis.tables import write_tables


def main(sm):
    write_tables(sm.input.scores, sm.input.em_rates, sm.input.comparisons, sm.params.definition, sm.params.custom,
                 sm.params.sizes, sm.params.repo, sm.config, dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
