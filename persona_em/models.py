"""Base models: built (the demo's tiny model), taken from a local path, or downloaded at a pinned revision.

The rule writes a manifest `model.json` whose `path` is the directory every later stage loads from and whose `chat`
block holds the model's chat settings (persona_em/chat.py).
Downloads happen here only: `prepare_model` is a login-side rule (localrules); compute jobs read the cache.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .chat import ChatSettings
from .cluster import offline
from .errors import UserError
from .io import write_json
from .storage import cache_writes, check_writable

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def download_model(name: str, hf_id: str, revision: str, cache_dir: str) -> Path:
    """Snapshot of `hf_id` at a commit, into cache_dir/models/<id>/<commit>. HF_TOKEN (env) opens gated repos."""
    if not COMMIT.match(revision):
        raise UserError(f"config models.{name}.revision: {revision!r} is not a pinned commit (40 hex digits); "
                        f"a branch or tag can move. Look it up on the model's 'Files and versions' page")
    path = Path(cache_dir) / "models" / hf_id.replace("/", "--") / revision
    if (path / "config.json").exists() and (path / ".complete").exists():
        return path
    if offline():
        raise UserError(f"config models.{name}: {hf_id}@{revision} is not in {path} and this process is offline "
                        f"(HF_HUB_OFFLINE is set): run prepare_model on the login node, where it is a localrule")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    check_writable(cache_dir, "cache_dir")
    token = os.environ.get("HF_TOKEN") or None
    try:
        with cache_writes(cache_dir, "cache_dir"):
            snapshot_download(hf_id, revision=revision, local_dir=str(path), token=token)
            (path / ".complete").write_text(revision + "\n")
    except GatedRepoError:
        hint = "HF_TOKEN is set but has no access: accept the licence on the model page" if token else \
            "export HF_TOKEN=<a read token of an account that accepted the model's licence>"
        raise UserError(f"config models.{name}: {hf_id} is a gated repository: {hint}") from None
    except RevisionNotFoundError:
        raise UserError(f"config models.{name}.revision: {hf_id} has no commit {revision}") from None
    except RepositoryNotFoundError:
        raise UserError(f"config models.{name}.hf_id: no repository {hf_id!r} (or it is private: set HF_TOKEN)") from None
    except UserError:
        raise
    except Exception as e:  # network and the like: the user's to fix
        raise UserError(f"config models.{name}: download of {hf_id}@{revision} failed: {e}") from None
    return path


def prepare_model(name: str, spec: dict, cache_dir: str, manifest_out: str) -> None:
    if "build_tiny" in spec:
        from .demo import build_tiny_model

        path = Path(manifest_out).parent / "weights"
        build_tiny_model(path, **spec["build_tiny"])
        source = {"build_tiny": spec["build_tiny"]}
    elif "path" in spec:
        path = Path(spec["path"])
        if not (path / "config.json").exists():
            raise UserError(f"config models.{name}.path: {path} is not a model directory (no config.json)")
        source = {"path": str(path)}
    else:
        path = download_model(name, spec["hf_id"], spec["revision"], cache_dir)
        source = {"hf_id": spec["hf_id"], "revision": spec["revision"]}
    # The chat settings (defaults filled in) travel in the manifest: every job that renders a prompt for this model
    # reads them from here (persona_em.chat.read_settings), so a changed setting reruns exactly those jobs.
    chat = ChatSettings.from_dict(spec.get("chat"), name).to_dict()
    write_json(manifest_out, {"model": name, "path": str(path.resolve()), **source, "chat": chat})
