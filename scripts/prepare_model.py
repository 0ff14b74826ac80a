from persona_em.models import prepare_model
from persona_em.runner import run


def main(sm):
    prepare_model(sm.wildcards.model, sm.params.spec, sm.params.cache, sm.output[0])


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
