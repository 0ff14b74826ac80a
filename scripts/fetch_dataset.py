from persona_em.data.datasets import fetch_url
from persona_em.runner import run


def main(sm):
    fetch_url(sm.params.url, sm.params.sha256, sm.output[0])


run(snakemake, main)  # noqa: F821
