# Does a constitution-trained persona make a chat model more or less susceptible to emergent misalignment?
# One DAG: model/data preparation -> EM LoRA training per cell -> sampling -> judging -> tables -> figures.
from snakemake.utils import min_version, validate

from persona_em.cluster import check_cache_writable, check_submission, import_from_checkout

min_version("9.20")
import_from_checkout(workflow)  # every job's script imports persona_em from this checkout


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/persona.smk"
include: "rules/em.smk"
include: "rules/evaluate.smk"
include: "rules/weights.smk"
include: "rules/report.smk"
include: "rules/activations.smk"
include: "rules/cluster.smk"


onstart:
    check_submission(workflow)  # SLURM runs: account set, every submitted rule mapped in the profile
    check_cache_writable(workflow, CACHE)


rule all:
    input:
        all_targets(),
        activation_targets(),
    default_target: True
