from persona_em.judge import judge_samples
from persona_em.runner import model_dir, optional, run


def main(sm):
    judge_model = optional(sm.input.judge_model)
    judge_samples(sm.input.samples, sm.input.questions, sm.params.name, sm.params.judge,
                  model_dir(judge_model) if judge_model else None, sm.params.journal, sm.output[0],
                  cache_path=sm.params.cache, judge_key=sm.wildcards.judge)


run(snakemake, main)  # noqa: F821
