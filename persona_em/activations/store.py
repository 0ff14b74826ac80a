"""The files of one cell's collect_activations output and their one reader (numpy: no torch needed, so the CPU
analysis rules run in envs/analysis.yaml)."""
from __future__ import annotations

from pathlib import Path

OWN, BASE = "own", "base"
READERS = (OWN, BASE)
KINDS = ("response_mean", "last_prompt")
TENSORS = "activations.safetensors"
INDEX = "index.tsv"
META = "meta.json"


def load_activations(out_dir: str | Path):
    """(tensors as numpy arrays, index DataFrame, meta) of one cell's collect_activations output."""
    from safetensors.numpy import load_file

    from persona_em.io import read_json, read_table

    out_dir = Path(out_dir)
    return load_file(str(out_dir / TENSORS)), read_table(out_dir / INDEX), read_json(out_dir / META)
