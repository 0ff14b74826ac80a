from persona_em.analysis.agreement import judge_agreement
from persona_em.runner import run


def main(sm):
    judge_agreement(sm.input.scores_a, sm.input.scores_b, sm.params.definitions, sm.params.custom, sm.output.table,
                    page=sm.output.page)


run(snakemake, main)  # noqa: F821
