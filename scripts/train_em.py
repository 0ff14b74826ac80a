from persona_em.config import Cell
from persona_em.chat import read_settings
from persona_em.models import model_dir
from persona_em.runner import optional, run
from persona_em.training.em import train_em


def main(sm):
    train_em(Cell.from_wildcards(sm.wildcards), model_dir(sm.input.model), optional(sm.input.persona),
             sm.input.train, sm.params.settings, sm.params.schedule, sm.params.work, sm.output.checkpoints,
             sm.output.log_table, chat=read_settings(sm.input.model))


run(snakemake, main)  # noqa: F821
