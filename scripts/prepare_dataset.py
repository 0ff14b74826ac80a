from persona_em.data.datasets import prepare_dataset
from persona_em.runner import run


def main(sm):
    spec = sm.params.spec
    prepare_dataset(sm.input[0], sm.wildcards.dataset, spec.get("sha256"), spec["eval_fraction"], spec["split_seed"],
                    sm.output.train, sm.output.eval, sm.output.manifest)


run(snakemake, main)  # noqa: F821
