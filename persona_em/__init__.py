"""persona_em: the logic behind the persona x emergent-misalignment workflow.

Every Snakemake rule calls one function of this package through a thin script in scripts/.
"""
__version__ = "0.1.0"
