from persona_em.aggregate import aggregate
from persona_em.runner import run


def main(sm):
    aggregate(list(sm.input), sm.wildcards.judge, sm.params.definitions, sm.params.custom, sm.output.scores,
              sm.output.em_rates)


run(snakemake, main)  # noqa: F821
