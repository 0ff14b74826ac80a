from persona_em.data.questions import fetch_questions
from persona_em.runner import run


def main(sm):
    fetch_questions(sm.params.url, sm.wildcards.questions_sha, sm.output[0])


run(snakemake, main)  # noqa: F821
