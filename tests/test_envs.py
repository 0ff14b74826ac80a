"""The conda environments of envs/ are true: generated from requirements.txt, named by the rules that use them, and
enough for those rules. (Creating them needs conda channels, which these machines cannot reach: not run here.)"""
from __future__ import annotations

import ast
import os
import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "envs"))
import generate  # noqa: E402  (envs/generate.py)

ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
RULE = re.compile(r"^(?:rule (\w+)|use rule \w+ as (\w+))", re.M)


def rules_envs_scripts() -> dict[str, tuple[str | None, str | None]]:
    """rule -> (conda env file, script file), both relative to the repository, from rules/*.smk."""
    out = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = list(RULE.finditer(text))
        for m, nxt in zip(starts, starts[1:] + [None]):
            body = text[m.start(): nxt.start() if nxt else len(text)]
            env = re.search(r'^    conda:\s*\n\s*"([^"]+)"', body, re.M)
            script = re.search(r'^    script:\s*\n\s*"([^"]+)"', body, re.M)
            rel = lambda v: str((smk.parent / v.group(1)).resolve().relative_to(REPO)) if v else None  # noqa: E731
            out[m.group(1) or m.group(2)] = (rel(env), rel(script))
    return out


def env_pins(path: Path) -> set[str]:
    spec = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {generate.canonical(line.split("==")[0]) for line in pip}


@pytest.mark.parametrize("stack", sorted(generate.STACKS))
def test_env_files_are_what_envs_generate_writes(stack):
    """Pins equal requirements.txt's, for the stack's packages and everything they need (run envs/generate.py)."""
    path = REPO / "envs" / f"{stack}.yaml"
    assert path.read_text() == generate.render(stack), f"{path} is out of date: run .venv/bin/python envs/generate.py"
    lock = generate.lock()
    for line in next(d["pip"] for d in yaml.safe_load(path.read_text())["dependencies"] if isinstance(d, dict)):
        name, version = line.split("==")
        assert lock[generate.canonical(name)][1] == version
        assert not line.startswith("-e"), "the environments never install the checkout (the Snakefile's PYTHONPATH does)"


def test_the_generator_pins_what_a_package_needs():
    """The closure is real: matplotlib brings pillow and kiwisolver, pandas brings python-dateutil."""
    pins = env_pins(REPO / "envs" / "analysis.yaml")
    assert {"matplotlib", "pillow", "kiwisolver", "pandas", "python-dateutil", "numpy"} <= pins
    assert "torch" not in pins and "snakemake" not in pins


def test_every_rule_names_an_existing_env_and_every_env_is_used():
    table = rules_envs_scripts()
    named = {env for env, script in table.values() if env}
    for rule, (env, script) in table.items():
        if script is not None and rule not in ("judge_api", "expand_prompts_api", "teacher_api"):
            assert env is not None, f"rule {rule} runs a script but names no conda environment"
        if env is not None:
            assert (REPO / env).is_file(), f"rule {rule}: {env} does not exist"
    assert named == {str(p.relative_to(REPO)) for p in ENV_FILES}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_headers_cite_files_that_exist(path):
    cited = re.findall(r"[\w./-]+\.(?:py|txt|yaml|toml|md)\b", "".join(
        line for line in path.read_text().splitlines(keepends=True) if line.startswith("#")))
    assert cited, "the header names the files it comes from"
    for name in cited:
        assert (REPO / name).exists(), f"{path.name} cites {name}, which does not exist"


# --- each stack is enough for its rules --------------------------------------------------------------------------
BLOCKER = """
import importlib.abc, importlib.machinery, sys, sysconfig
from importlib import metadata
allowed_dists, run = {allowed!r}, {run!r}
canonical = lambda n: n.replace("_", "-").replace(".", "-").lower()
names = {{m for m, ds in metadata.packages_distributions().items() if any(canonical(d) in allowed_dists for d in ds)}}
allowed = names | set(sys.stdlib_module_names) | {{"persona_em"}}
base = sysconfig.get_paths(vars={{"base": sys.base_prefix, "platbase": sys.base_exec_prefix}})
stdlib = tuple(base[k] + "/" for k in ("stdlib", "platstdlib"))

class OnlyTheEnvironment(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in allowed:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = (spec.origin or "") if spec is not None else ""
        if origin.startswith(stdlib) and "site-packages" not in origin:  # private stdlib modules (_sysconfigdata...)
            return None
        raise ModuleNotFoundError(f"{{name}} is not in the conda environment", name=name)

sys.meta_path.insert(0, OnlyTheEnvironment())
exec(run)
"""


def run_with_only(env: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a Python that can import only the standard library, persona_em and what `env` installs."""
    script = BLOCKER.format(allowed=sorted(env_pins(env)), run=code)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "HOME": str(Path.home())})


def test_the_blocker_blocks():
    res = run_with_only(REPO / "envs" / "analysis.yaml", "import torch")
    assert res.returncode != 0 and "torch is not in the conda environment" in res.stderr


ANALYSIS_RULES = {"aggregate": "scripts/aggregate.py", "judge_agreement": "scripts/judge_agreement.py",
                  "fetch_questions": "scripts/fetch_questions.py", "summary_tables": "scripts/tables.py",
                  "plot_figures": "scripts/figures.py", "report_pages": "scripts/report_pages.py",
                  "misalignment_direction": "scripts/misalignment_direction.py",
                  "activation_projections": "scripts/activation_projections.py",
                  "activation_figures": "scripts/activation_figures.py",
                  "persona_retention": "scripts/persona_retention.py",
                  "persona_retention_figure": "scripts/persona_retention_figure.py"}


def test_analysis_env_runs_every_analysis_rule(tmp_path):
    """What each rule on envs/analysis.yaml calls, on small inputs, with nothing importable but that environment."""
    from test_aggregate import BASE0, judged_rows, key_of, write

    table = rules_envs_scripts()
    assert {r: s for r, (e, s) in table.items() if e == "envs/analysis.yaml"} == ANALYSIS_RULES
    for judge in ("j", "k"):
        for persona in ("none", "p"):
            for seed in (0, 1):
                write(tmp_path / judge / f"{persona}{seed}.jsonl",
                      judged_rows(persona, seed, BASE0 * 2, judge=judge, step=4, question_id="q1"))
    questions = REPO / "config" / "demo" / "questions.yaml"
    sha = hashlib.sha256(questions.read_bytes()).hexdigest()
    code = f"""
import json
from pathlib import Path
from persona_em.analysis.aggregate import aggregate
from persona_em.analysis.agreement import judge_agreement
from persona_em.artifacts import FIGURE_NAMES, FIGURE_SUFFIXES, TABLE_NAMES
from persona_em.reporting.figures import make_figures
from persona_em.provenance import provenance_page
from persona_em.data.questions import fetch_questions
from persona_em.analysis.tables import tables_page, write_tables
out, defs = Path({str(tmp_path)!r}), ["betley", "model_organisms"]
t = {{}}
for judge in ("j", "k"):
    t[judge] = {{k: str(out / judge / f"{{k}}.tsv") for k in ("scores", "em_rates", "summary", "seeds", "comparisons")}}
    aggregate(sorted(str(p) for p in (out / judge).glob("*.jsonl")), judge + "-0123abcd", defs, {{}},
              t[judge]["scores"], t[judge]["em_rates"], t[judge]["summary"], t[judge]["seeds"],
              t[judge]["comparisons"], n_bootstrap=200)
judge_agreement(t["j"]["scores"], t["k"]["scores"], defs, {{}}, str(out / "agreement.tsv"),
                page=str(out / "agreement.html"))
fetch_questions({questions.as_uri()!r}, {sha!r}, str(out / "questions.yaml"))
tables = {{n: str(out / "tables" / f"{{n}}.tsv") for n in TABLE_NAMES}}
tables.update({{f"{{n}}_provenance": str(out / "tables" / f"{{n}}.provenance.json") for n in TABLE_NAMES}})
tables["response_examples_md"] = str(out / "tables" / "response_examples.md")
j = t["j"]
write_tables(j["scores"], j["em_rates"], j["comparisons"], "betley", {{}}, {{}}, {str(REPO)!r}, {{}}, tables)
figures = {{f"{{n}}_{{k}}": str(out / "figures" / f"{{n}}.{{s}}") for n in FIGURE_NAMES for k, s in FIGURE_SUFFIXES.items()}}
make_figures(j["scores"], j["em_rates"], [], tables["persona_vs_baseline"], tables["response_examples"], "betley", {{}},
             {{}}, {str(REPO)!r}, {{}}, figures, onset_path=tables["onset"],
             controls_path=tables["control_contrasts"])
tables_page({{n: tables[n] for n in TABLE_NAMES}}, str(out / "tables.html"), "tables")
provenance_page([tables[f"{{n}}_provenance"] for n in TABLE_NAMES], str(out / "provenance.html"), "provenance")
print("analysis rules ran")
"""
    res = run_with_only(REPO / "envs" / "analysis.yaml", code)
    assert res.returncode == 0 and "analysis rules ran" in res.stdout, res.stderr[-3000:]
    assert (tmp_path / "figures" / "persona_vs_baseline.png").stat().st_size > 0
    assert "|" in (tmp_path / "tables" / "response_examples.md").read_text()


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any level (module top or inside functions), relative ones resolved."""
    tree, found = ast.parse(path.read_text()), set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def module_file(name: str) -> Path | None:
    for candidate in (REPO / Path(*name.split(".")).with_suffix(".py"), REPO / Path(*name.split(".")) / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_torch_env_holds_every_package_the_model_rules_import():
    """Static: every import, also inside functions, of every persona_em module a torch-env rule's script reaches."""
    pins = env_pins(REPO / "envs" / "torch.yaml")
    dists = metadata.packages_distributions()
    scripts = {s for e, s in rules_envs_scripts().values() if e == "envs/torch.yaml"}
    todo, seen, third_party = [REPO / s for s in scripts], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            top = name.split(".")[0]
            if top == "persona_em":
                if (f := module_file(name)) is not None:
                    todo.append(f)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    third_party.discard("snakemake_interface_executor_plugins")  # persona_em.cluster: only where snakemake runs
    third_party.discard("triton")  # sampling/decode_kernel.py: imported only where present (CUDA torch brings it)
    missing = {top: dists.get(top) for top in third_party
               if not any(generate.canonical(d) in pins for d in dists.get(top, []))}
    assert not missing, f"imported by the model rules but not in envs/torch.yaml: {json.dumps(missing)}"
    assert {"torch", "transformers", "peft", "trl", "openai"} <= third_party


def test_jobs_import_persona_em_from_the_checkout(monkeypatch):
    """The Snakefile puts the checkout on PYTHONPATH: first in the venv; alone in conda environments."""
    from types import SimpleNamespace

    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    from persona_em.cluster import import_from_checkout

    def workflow(*methods):
        return SimpleNamespace(basedir="/repo", deployment_settings=SimpleNamespace(deployment_method=set(methods)))

    monkeypatch.setenv("PYTHONPATH", "/site/extra:/repo")
    import_from_checkout(workflow())
    assert os.environ["PYTHONPATH"] == "/repo:/site/extra"
    import_from_checkout(workflow())  # parsed again in a job: unchanged
    assert os.environ["PYTHONPATH"] == "/repo:/site/extra"
    import_from_checkout(workflow(DeploymentMethod.CONDA))
    assert os.environ["PYTHONPATH"] == "/repo"
    for profile in ("local", "leonardo"):  # without this Snakemake drops PYTHONPATH in conda environments
        assert yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())[
            "conda-not-block-search-path-envvars"] is True
