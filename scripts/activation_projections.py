from persona_em.activations.projections import activation_projections
from persona_em.runner import run


def main(sm):
    activation_projections(list(sm.input.activations), dict(sm.params.directions), list(sm.input.vectors),
                           sm.input.scores, sm.params.settings, sm.params.n_bootstrap, sm.wildcards.judge,
                           dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
