from persona_em.config import Cell
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import optional, run
from persona_em.sampling.sample import sample_cell


def main(sm):
    sample_cell(Cell.from_wildcards(sm.wildcards), model_dir(sm.input.model), optional(sm.input.persona),
                sm.input.checkpoints, sm.input.questions, sm.params.settings, sm.params.journal, sm.output[0],
                chat=read_settings(sm.input.model), compile_cache_dir=sm.params.compile_cache)


run(snakemake, main)  # noqa: F821
