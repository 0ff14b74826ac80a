from persona_em.analysis.weights import write_weight_tables
from persona_em.config import Cell
from persona_em.runner import optional, run


def main(sm):
    write_weight_tables(sm.input.checkpoints, Cell.from_wildcards(sm.wildcards).keys(), optional(sm.input.persona),
                        sm.params.repo, sm.config, dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
