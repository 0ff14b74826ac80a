from persona_em.activations.persona_vectors import persona_vectors
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import run


def main(sm):
    persona_vectors(sm.wildcards.model, sm.wildcards.persona, dict(sm.params.source), model_dir(sm.input.model),
                    sm.params.settings, sm.params.template, sm.params.work, sm.output[0],
                    chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821
