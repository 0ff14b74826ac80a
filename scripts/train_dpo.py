from persona_em.persona.train_dpo import train_dpo
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import run


def main(sm):
    train_dpo(sm.wildcards.persona, sm.wildcards.model, model_dir(sm.input.model), sm.input.pairs,
              sm.params.settings, sm.params.work, sm.output[0], chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
