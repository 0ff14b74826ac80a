from persona_em.reporting.figures import make_figures
from persona_em.reporting.weights_figures import make_weight_figures
from persona_em.runner import run


def main(sm):
    make_figures(sm.input.scores, sm.input.em_rates, list(sm.input.train_logs), sm.input.comparisons,
                 sm.input.examples, sm.params.definition, sm.params.custom, sm.params.sizes, sm.params.repo,
                 sm.config, dict(sm.output.items()),
                 onset_path=sm.input.onset, controls_path=sm.input.controls)
    make_weight_figures(list(sm.input.weight_norms), list(sm.input.weight_rotation), sm.input.em_rates,
                        sm.params.definition, sm.params.custom, sm.params.repo, sm.config, dict(sm.output.items()))


run(snakemake, main)  # noqa: F821
