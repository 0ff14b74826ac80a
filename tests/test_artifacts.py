"""README "Outputs" is generated from persona_em/artifacts.py, and artifacts.py names every table the workflow makes."""
import re

from conftest import REPO

from persona_em import artifacts


def test_readme_outputs_are_generated_from_artifacts():
    readme = (REPO / "README.md").read_text()
    assert readme == artifacts.readme_with_outputs(readme), \
        "README 'Outputs' differs from persona_em/artifacts.py: run .venv/bin/python -m persona_em.artifacts"
    block = readme.split(artifacts.BEGIN)[1].split(artifacts.END)[0]
    for name in [*artifacts.JUDGE_TABLES, *artifacts.SUMMARY_TABLES]:
        assert f"`tables/{{judge}}/{name}.tsv`" in block, name
    for name in artifacts.FIGURES:
        assert f"`figures/{{judge}}/{name}.png`" in block, name


def test_readme_check_can_fail():
    readme = (REPO / "README.md").read_text()
    stale = readme.replace("| `tables/{judge}/seeds.tsv` |", "| `tables/{judge}/seed_table.tsv` |")
    assert stale != readme and artifacts.readme_with_outputs(stale) == readme


def test_every_table_path_of_the_workflow_is_in_artifacts():
    """A table path written into rules/common.smk by hand must be listed in artifacts.py (and so in the README)."""
    common = (REPO / "rules" / "common.smk").read_text()
    literal = set(re.findall(r'tables/\{\{judge\}\}/(\w+)\.tsv"', common))
    assert literal == set(artifacts.JUDGE_TABLES), "add the table to persona_em/artifacts.py JUDGE_TABLES"
    assert 'for name in TABLE_NAMES}' in common and 'for name in FIGURE_NAMES' in common
