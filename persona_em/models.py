"""Base models: built (the demo's tiny model), taken from a local path, or downloaded at a pinned revision.

The rule writes a manifest `model.json` whose `path` is the directory every later stage loads from.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .io import write_json


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
        from huggingface_hub import snapshot_download

        path = Path(cache_dir) / "models" / spec["hf_id"].replace("/", "--") / spec["revision"]
        try:
            snapshot_download(spec["hf_id"], revision=spec["revision"], local_dir=str(path))
        except Exception as e:  # network, auth, unknown revision: all the user's to fix
            raise UserError(f"config models.{name}: download of {spec['hf_id']}@{spec['revision']} failed: {e}") from None
        source = {"hf_id": spec["hf_id"], "revision": spec["revision"]}
    write_json(manifest_out, {"model": name, "path": str(path.resolve()), **source})
