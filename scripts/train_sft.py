from persona_em.persona.introspection import train_sft
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import run


def main(sm):
    train_sft(sm.wildcards.persona, sm.wildcards.model, model_dir(sm.input.model), sm.input.dpo_adapter,
              sm.input.data, sm.params.settings, sm.params.work, sm.output[0], chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
