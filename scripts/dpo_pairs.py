from persona_em.persona.pairs import make_pairs
from persona_em.runner import model_dir, run


def main(sm):
    make_pairs(sm.input.teacher, sm.input.student, model_dir(sm.input.model), sm.params.settings, sm.output.pairs,
               sm.output.stats)


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
