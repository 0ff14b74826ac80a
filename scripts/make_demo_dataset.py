from persona_em.demo import write_demo_dataset
from persona_em.runner import run


def main(sm):
    spec = sm.params.spec
    write_demo_dataset(spec["kind"], sm.output[0], n_rows=spec["n_rows"], seed=spec["seed"])


run(snakemake, main)  # noqa: F821
