from persona_em.activations.collect import collect_cell
from persona_em.chat import read_settings
from persona_em.config import Cell
from persona_em.models import model_dir
from persona_em.runner import optional, run


def main(sm):
    collect_cell(Cell.from_wildcards(sm.wildcards), model_dir(sm.input.model), optional(sm.input.persona),
                 sm.input.checkpoints, sm.input.samples, sm.input.questions, sm.params.settings, sm.params.work,
                 sm.output[0], chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821
