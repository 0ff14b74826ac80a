from persona_em.analysis.aggregate import aggregate
from persona_em.runner import run


def main(sm):
    aggregate(list(sm.input), sm.wildcards.judge, sm.params.definitions, sm.params.custom, sm.output.scores,
              sm.output.em_rates, summary_out=sm.output.summary, seeds_out=sm.output.seeds,
              comparisons_out=sm.output.comparisons, policy=sm.params.policy, n_bootstrap=sm.params.n_bootstrap,
              bootstrap_seed=sm.params.bootstrap_seed, identity=sm.params.identity,
              identity_out=sm.output.identity, label_rates_out=sm.output.label_rates)


run(snakemake, main)  # noqa: F821
