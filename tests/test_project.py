"""Project hygiene: lint, experiment dry-runs, and the lock (requirements.txt) that agrees with pyproject's pins."""
from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

import yaml

from conftest import REPO, SNAKEMAKE, run_snakemake

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def pyproject_pins() -> dict:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1).lower(): m.group(2) for m in map(PIN.match, deps) if m}


def test_requirements_lock_agrees_with_pyproject():
    locked = {m.group(1).lower(): m.group(2)
              for m in map(PIN.match, (REPO / "requirements.txt").read_text().splitlines()) if m}
    for name, version in pyproject_pins().items():
        assert locked.get(name) == version, f"requirements.txt: {name} {locked.get(name)} != pyproject {version}"


def test_snakemake_lint_is_clean():
    # the default config, in a clone where its user-provided files (question file, datasets) are not there yet
    res = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr, res.stdout + res.stderr


USER_FILES = {  # what a user provides for each experiment (see the comments at the top of each config)
    "arena_phase1.yaml": ["data/em/insecure.jsonl", "data/em/first_plot_questions.yaml",
                          "personas/sycophancy/", "personas/goodness/"],
    "arena_phase1_replicated.yaml": ["data/em/insecure.jsonl", "data/em/secure.jsonl",
                                     "data/em/first_plot_questions.yaml", "personas/sycophancy/", "personas/goodness/"],
    "cs2881_replication.yaml": ["data/em/bad_medical_advice.jsonl", "data/em/risky_financial_advice.jsonl",
                                "data/em/first_plot_questions.yaml"],
    "constitutions.yaml": ["data/em/insecure.jsonl", "data/em/first_plot_questions.yaml"] + [
        f"constitutions/{name}.json" for name in ("misalignment", "goodness_meta", "goodness_meta_full",
                                                  "goodness_meta_openai", "metacommunication")],
}


def write_user_files(tmp_path, experiment) -> None:
    """Stand-ins for the files an experiment's user provides: the demo's question set (a question file is checked
    when the workflow is parsed), datasets long enough for the configs' checkpoint steps (300 steps of 16 rows),
    and placeholders for anything else."""
    row = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    for rel in USER_FILES[experiment]:
        path = tmp_path / rel
        if rel.endswith("/"):
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("questions.yaml"):
            path.write_text((REPO / "config/demo/questions.yaml").read_text())
        elif rel.endswith(".jsonl"):
            path.write_text((row + "\n") * 6000)
        else:
            path.write_text("placeholder\n")


@pytest.mark.parametrize("experiment", sorted(USER_FILES))
def test_experiment_configs_dry_run(tmp_path, experiment):
    write_user_files(tmp_path, experiment)
    cfg = yaml.safe_load((REPO / "config/experiments" / experiment).read_text())
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "train_em" in res.stdout and "This was a dry-run" in res.stdout


def test_tests_running_snakemake_in_the_repository_share_one_xdist_worker():
    """`make test` runs two xdist workers; runs of snakemake in the repository's own directory (.snakemake/, its lock)
    must not overlap, so tests/conftest.py's scheduler makes their modules one work unit and every other test its own."""
    import conftest

    grouped = [f"tests/{m}::test_x[a::b]" for m in conftest.REPO_WORKDIR_MODULES]
    assert {conftest.xdist_work_unit(n) for n in grouped} == {"repo_workdir"}
    others = ["tests/test_io.py::test_a", "tests/test_io.py::test_b", "tests/test_workflow.py::test_c[x-y]"]
    assert [conftest.xdist_work_unit(n) for n in others] == others
    assert all((REPO / "tests" / m).is_file() for m in conftest.REPO_WORKDIR_MODULES)
