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


def demo_config(tmp: Path, **changes) -> dict:
    """config/demo.yaml made self-contained under `tmp` (absolute paths), with top-level keys replaced by `changes`."""
    cfg = yaml.safe_load((REPO / "config/demo.yaml").read_text())
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
