from persona_em.persona.responses import respond
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import optional, run


def main(sm):
    manifest = optional(sm.input.generator_model)
    respond("teacher", sm.input.constitution, sm.input.prompts, sm.params.generator,
            model_dir(manifest) if manifest else None, sm.params.settings, sm.params.journal, sm.output[0],
            chat=read_settings(manifest) if manifest else None)


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
