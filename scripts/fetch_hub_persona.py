from persona_em.persona.hub import fetch_hub_persona
from persona_em.runner import run


def main(sm):
    fetch_hub_persona(sm.wildcards.persona, sm.params.spec, sm.params.cache, sm.output[0])


run(snakemake, main)  # noqa: F821 (injected by Snakemake)
