from pathlib import Path

from persona_em.provenance import provenance_page
from persona_em.runner import run
from persona_em.analysis.tables import tables_page


def main(sm):
    judge = sm.wildcards.judge
    tables = {Path(p).name.removesuffix(".tsv"): p for p in sm.input.tables}
    tables_page(tables, sm.output.tables, f"Summary tables, judge {judge}")
    provenance_page(list(sm.input.sidecars), sm.output.provenance, f"Provenance of every artifact, judge {judge}")


run(snakemake, main)  # noqa: F821
