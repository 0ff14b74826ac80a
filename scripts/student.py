from persona_em.persona.responses import respond
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import run


def main(sm):
    generator = {"name": f"student_{sm.wildcards.model}", "backend": "hf", "model": sm.wildcards.model,
                 "batch_size": sm.params.settings["batch_size"]}
    respond("student", sm.input.constitution, sm.input.prompts, generator, model_dir(sm.input.model),
            sm.params.settings, sm.params.journal, sm.output[0], chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
