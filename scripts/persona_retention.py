from persona_em.activations.projections import persona_retention_table
from persona_em.runner import run


def main(sm):
    persona_retention_table(list(sm.input.activations), list(sm.input.vectors), sm.params.settings,
                            sm.params.n_bootstrap, sm.output.persona_retention)


run(snakemake, main)  # noqa: F821
