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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, a real instruct model, converted by the workflow's own prepare_model code from the
    GGUF pinned in config/demo.yaml and cached per machine (tests/real_assets.py)."""
    import real_assets

    return real_assets.smollm2_dir()


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

    from persona_em.judge import judge_key

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
