from persona_em.chat import read_settings
from persona_em.judging.run import judge_samples
from persona_em.models import model_dir
from persona_em.runner import optional, run


def main(sm):
    judge_model = optional(sm.input.judge_model)
    judge = sm.params.judge
    if judge_model:  # a local (hf) judge renders its prompts with its model's chat settings
        judge = {**judge, "chat": read_settings(judge_model).to_dict()}
    judge_samples(sm.input.samples, sm.input.questions, sm.params.name, judge,
                  model_dir(judge_model) if judge_model else None, sm.params.journal, sm.output[0],
                  cache_path=sm.params.cache, judge_key=sm.wildcards.judge)


run(snakemake, main)  # noqa: F821
