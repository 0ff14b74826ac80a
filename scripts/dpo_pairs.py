from persona_em.persona.pairs import make_pairs
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import run


def main(sm):
    make_pairs(sm.input.teacher, sm.input.student, model_dir(sm.input.model), sm.params.settings, sm.output.pairs,
               sm.output.stats, chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
