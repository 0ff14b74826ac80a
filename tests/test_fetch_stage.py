"""The fetch stage (login-side downloads into cache_dir) and its bad inputs: each gives one clear error."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona_em.errors import UserError
from persona_em.models import prepare_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = "a09a35458c702b33eeacc393d103063234e8bc28"
SPEC = {"hf_id": "Qwen/Qwen2.5-7B-Instruct", "revision": COMMIT}


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download replaced by a local writer (only package registries are reachable from here)."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision, local_dir, token=None, payload=b"{}"):
        calls.append({"repo_id": repo_id, "revision": revision, "token": token})
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_bytes(b"{}")
        (Path(local_dir) / "model.safetensors").write_bytes(os.urandom(fake_hub_size[0]))
        return local_dir

    fake_hub_size = [1024]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls, fake_hub_size


def test_download_at_pinned_commit_with_token_from_env(tmp_path, fake_hub, monkeypatch):
    calls, _ = fake_hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    prepare_model("qwen7b", SPEC, str(tmp_path / "cache"), str(tmp_path / "model.json"))
    assert calls == [{"repo_id": SPEC["hf_id"], "revision": COMMIT, "token": "hf_secret"}]
    manifest = (tmp_path / "model.json").read_text()
    assert COMMIT in manifest and "hf_secret" not in manifest
    prepare_model("qwen7b", SPEC, str(tmp_path / "cache"), str(tmp_path / "model.json"))
    assert len(calls) == 1, "a complete snapshot in the cache is not downloaded again"


def test_revision_must_be_a_commit(tmp_path, fake_hub):
    with pytest.raises(UserError, match=r"models.qwen7b.revision: 'main' is not a pinned commit"):
        prepare_model("qwen7b", {**SPEC, "revision": "main"}, str(tmp_path), str(tmp_path / "m.json"))


def test_gated_repo_without_token_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        e = GatedRepoError.__new__(GatedRepoError)  # as the hub client raises it on a 403 for a gated repo
        Exception.__init__(e, "403 Client Error: access to model is restricted")
        raise e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match=r"is a gated repository: export HF_TOKEN="):
        prepare_model("qwen7b", SPEC, str(tmp_path), str(tmp_path / "m.json"))


def test_compute_job_that_would_need_the_network(tmp_path, fake_hub, monkeypatch):
    calls, _ = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"is not in .* and this process is offline .* run prepare_model on the login"):
        prepare_model("qwen7b", SPEC, str(tmp_path / "cache"), str(tmp_path / "m.json"))
    assert calls == [] and not (tmp_path / "m.json").exists()


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_cache_dir_on_read_only_disk(tmp_path, fake_hub):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as cache:
        with pytest.raises(UserError, match=r"^cache_dir .*/ro/sub: cannot write there: the file system is read-only"):
            prepare_model("qwen7b", SPEC, str(cache / "sub"), str(tmp_path / "m.json"))
    assert fake_hub[0] == []


def test_cache_dir_on_full_disk(tmp_path, fake_hub):
    fake_hub[1][0] = 4 << 20  # a 4 MiB weight file into a 1 MiB disk
    with tmpfs(tmp_path / "full", "size=1m") as cache:
        with pytest.raises(UserError, match=r"^cache_dir .*/full: cannot write there: the disk is full"):
            prepare_model("qwen7b", SPEC, str(cache), str(tmp_path / "m.json"))
    assert not (tmp_path / "m.json").exists()


def test_rule_writing_to_a_read_only_cache_fails_with_one_line(tmp_path):
    """Through the snakemake CLI: the demo's dataset goes into cache_dir; a read-only cache stops the run before
    any job starts, with one error naming the directory."""
    import yaml

    cfg = yaml.safe_load((REPO / "config/demo.yaml").read_text())
    with tmpfs(tmp_path / "ro", "size=1m") as cache:
        (cache / "datasets/demo").mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        cfg.update(results_dir=str(tmp_path / "results"), work_dir=str(tmp_path / "work"), cache_dir=str(cache))
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        run = subprocess.run(
            [str(Path(sys.executable).with_name("snakemake")), f"{cache}/datasets/demo/insecure_demo.jsonl",
             "--profile", "profiles/local", "--cores", "1", "--configfile", str(tmp_path / "c.yaml")],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert run.returncode != 0
    errors = [l for l in run.stderr.splitlines() if "cannot write there" in l]
    assert len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith(f"cache_dir {cache}: cannot write there: the file system is read-only")
    assert "UserError" in run.stderr and "rule make_demo_dataset:" not in run.stderr  # no job was started


def test_any_rule_hitting_a_full_disk_is_one_error_line(tmp_path, capfd):
    """runner.run (every rule script's entry) turns ENOSPC/EROFS/EDQUOT into one ERROR line and exit 1."""
    import errno
    import sys
    from types import SimpleNamespace

    from persona_em.runner import run

    def main(sm):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache/x.jsonl"))

    sm = SimpleNamespace(log=[str(tmp_path / "rule.log")], rule="fetch_dataset", wildcards={}, resources={})
    stderr = sys.stderr
    try:
        with pytest.raises(SystemExit) as exit_:
            run(sm, main)
    finally:
        sys.stderr = stderr
    assert exit_.value.code == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"ERROR in rule fetch_dataset: {tmp_path}/cache/x.jsonl: the disk is full (No space left on device): "
                   f"free space there or point the config at another directory"]
