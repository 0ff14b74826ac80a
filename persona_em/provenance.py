"""Provenance of every figure and table: which code, config, judge, seeds, packages and machine made it, from what.

Each artifact gets a sidecar `<artifact>.provenance.json` beside it (figures: one sidecar for the PNG, SVG and caption).
The sidecar holds no timestamp, so rebuilding from the same tables with the same code on the same host gives
byte-identical sidecars too; the artifacts themselves never embed provenance (a new commit must not change a PNG).

Host and GPU: the machine that built the artifact, and, where the input tables carry `host` / `gpu` columns, the machines
that produced the data (the model stages do not record them yet: then the sidecar says so).
"""
from __future__ import annotations

import html
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from persona_em.io import read_json, sha256_file, stable_hash, write_json, write_text
from persona_em.judging.identity import JUDGE_COLUMNS

# Packages whose versions can change a number or a pixel in an artifact (model stages included: they made the data).
PACKAGES = ("persona-em", "snakemake", "pandas", "numpy", "scipy", "matplotlib", "seaborn", "torch", "transformers",
            "peft", "trl", "openai")
# Seed of every random draw in figures and tables (bootstrap resamples); fixed so rebuilds are byte-identical.
FIGURE_SEED = 0
NOT_RECORDED = "not recorded by the stages that made the tables"


def _run(args: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state(repo: str | Path) -> dict:
    """Commit of the workflow's repository and whether the working tree had uncommitted changes."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=str(repo))
    if commit is None:
        return {"git_commit": "unknown (not a git repository)", "git_dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(repo))
    return {"git_commit": commit, "git_dirty": bool(status)}


def gpu_names() -> list[str]:
    """Names of the GPUs nvidia-smi sees; empty on a machine without one (figures never need a GPU)."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in (out or "").splitlines() if line.strip()]


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _unique(frames: list, column: str) -> list:
    values = set()
    for frame in frames:
        if frame is not None and column in frame:
            values.update(str(v) for v in frame[column].dropna().unique())
    return sorted(values)


def judge_identity(scores) -> dict:
    """The judge's identity as the scores table records it (one judge per table: aggregate refuses to pool)."""
    if scores is None or len(scores) == 0:  # None: an artifact no judge made (e.g. the weight tables)
        return {k: None for k in JUDGE_COLUMNS}
    rows = scores[JUDGE_COLUMNS].drop_duplicates().astype(str).to_dict("records")
    return rows[0] if len(rows) == 1 else {k: sorted({r[k] for r in rows}) for k in JUDGE_COLUMNS}


def collect(repo: str | Path, config: dict, scores, other_frames: list = (), em_definition: str | None = None) -> dict:
    """The provenance shared by every artifact one rule writes."""
    frames = [scores, *other_frames]
    cell_seeds = sorted({int(s) for f in frames if f is not None and "seed" in f for s in f["seed"].dropna().unique()})
    upstream_hosts, upstream_gpus = _unique(frames, "host"), _unique(frames, "gpu")
    return {
        **git_state(repo),
        "config_hash": stable_hash(config),
        "packages": package_versions(),
        "judge": judge_identity(scores),
        "em_definition": em_definition,
        "seeds": {"cell_seeds": cell_seeds, "sampling_seed": config.get("sampling", {}).get("seed"),
                  "figure_seed": FIGURE_SEED},
        "built_on": {"host": socket.gethostname(), "gpu": gpu_names() or ["none"]},
        "data_produced_on": {"host": upstream_hosts or NOT_RECORDED, "gpu": upstream_gpus or NOT_RECORDED},
    }


def write_sidecar(path: str | Path, artifact: str, files: list[str], inputs: list[str], shared: dict,
                  extra: dict | None = None) -> None:
    """Sidecar of one artifact: its files' and inputs' sha256 plus the shared provenance."""
    write_json(path, {
        "artifact": artifact,
        "files": {Path(f).name: sha256_file(f) for f in files},
        "inputs": {str(i): sha256_file(i) for i in inputs},
        **shared,
        **(extra or {}),
    })


def judge_text(j: dict) -> str:
    """A judge identity (judge_identity) in words: name, path key, model, mode, prompt templates."""
    return (f"{j['judge']} (key {j['judge_key']}, model {j['judge_model']}, mode {j['judge_mode']}, "
            f"prompts {j['judge_prompt_hash']})")


def short_line(shared: dict) -> str:
    """One line for captions: commit, config hash, judge identity."""
    dirty = " (uncommitted changes)" if shared.get("git_dirty") else ""
    return (f"git {str(shared['git_commit'])[:12]}{dirty}; config {shared['config_hash']}; "
            f"judge {judge_text(shared['judge'])}; "
            f"seeds {shared['seeds']['cell_seeds']}, figure seed {shared['seeds']['figure_seed']}; "
            f"built on {shared['built_on']['host']}")


def _cell(value) -> str:
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return html.escape(", ".join(map(str, value)))
    return html.escape(str(value))


def provenance_page(sidecars: list[str], out: str, title: str) -> None:
    """One HTML page (for `snakemake --report`) listing the provenance of every artifact of one judge."""
    records = [read_json(p) for p in sidecars]
    shared_keys = ["git_commit", "git_dirty", "config_hash", "judge", "em_definition", "seeds", "built_on",
                   "data_produced_on", "packages"]
    parts = [f"<h2>{html.escape(title)}</h2>", "<table border='1' cellpadding='4'>"]
    first = records[0] if records else {}
    for key in shared_keys:
        values = {str(r.get(key)) for r in records}
        note = "" if len(values) <= 1 else " <b>(differs between artifacts: see below)</b>"
        parts.append(f"<tr><th align='left'>{key}</th><td>{_cell(first.get(key))}{note}</td></tr>")
    parts.append("</table><h3>Artifacts</h3><table border='1' cellpadding='4'>"
                 "<tr><th>artifact</th><th>files (sha256)</th><th>inputs (sha256)</th><th>git commit</th></tr>")
    for r in records:
        files = "<br>".join(f"{html.escape(k)}: {v[:16]}" for k, v in sorted(r["files"].items()))
        inputs = "<br>".join(f"{html.escape(k)}: {v[:16]}" for k, v in sorted(r["inputs"].items()))
        parts.append(f"<tr><td>{html.escape(r['artifact'])}</td><td>{files}</td><td>{inputs}</td>"
                     f"<td>{html.escape(str(r['git_commit'])[:12])}</td></tr>")
    parts.append("</table>")
    write_text(out, "<!doctype html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title)
               + "</title></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
