"""Atomic outputs and append-only journals: the two ways this project writes files.

Atomic: a reader (or Snakemake after a crash) sees either no file or the whole file, never a torn one.
Journal: long stages append one JSON line per finished item and fsync, so a kill loses at most the item in flight;
on restart, `Journal.load()` drops a torn last line and returns what was done.

Temporaries live beside their target as `.<target name>.<8 random characters>.tmp[<suffix>]`. A process killed while
writing (SIGKILL, a node failure) cannot remove its temporary; the next write of the same target removes it. Only one
job ever writes a given target (Snakemake gives each output one producer; resume state belongs to one cell's job), so
a temporary of the target that exists when a write starts belongs to a writer that is dead.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from persona_em.errors import UserError


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` that a killed writer left beside it (the names `_tmp_beside` and
    `atomic_dir` make: `tempfile`'s 8 random characters from [a-z0-9_], so no other target's temporary matches)."""
    if not path.parent.is_dir():
        return
    name = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?")
    for stale in path.parent.iterdir():
        if name.fullmatch(stale.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)


def _tmp_beside(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _default_mode(directory: bool) -> int:
    """The mode a plain open()/mkdir() would give under the process's umask (tempfile's are 0600 / 0700, which would
    hide outputs from the other members of a project sharing results_dir or cache_dir)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `suffix` keeps the extension for writers that infer the format from the name (e.g. matplotlib).
    """
    path = Path(path)
    tmp = _tmp_beside(path, suffix)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_table(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as TSV, atomically. Strings are quoted: model output may hold tabs, newlines, CR."""
    import csv

    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")


def read_table(path: str | os.PathLike):
    """Read a TSV written by `write_table`."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: table not found")
    # the status "null" is a word, and a label question's labels (TRUE / FALSE) stay text, not booleans
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""], dtype={"label": str})


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short content hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


class Journal:
    """Append-only JSONL of finished items, keyed by `key_field`, that survives SIGKILL.

    Each `append` writes one whole line and fsyncs it. `load` ignores a torn last line (the item in flight
    when the process died) and truncates it away so later appends start on a clean line.
    """

    def __init__(self, path: str | os.PathLike, key_field: str = "key"):
        self.path = Path(path)
        self.key_field = key_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def load(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if not self.path.exists():
            return done
        good_bytes = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn write: the process died mid-line
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break
                good_bytes += len(raw)
                done[row[self.key_field]] = row
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return done

    def append(self, row: dict) -> None:
        self.append_many([row])

    def append_many(self, rows: list[dict]) -> None:
        """Append whole lines with one fsync (group commit, for stages finishing many items per second)."""
        if not rows:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        if self.path.exists():
            self.path.unlink()


def latest_trainer_checkpoint(trainer_dir: Path, log=None) -> Path | None:
    """The newest whole `checkpoint-N` of a transformers Trainer under `trainer_dir`, or None.

    transformers writes trainer_state.json last, so a checkpoint is whole once that file parses. A process killed
    while writing it (SIGKILL at the end of a SLURM KillWait, a node failure) leaves it empty, cut off or missing;
    such a checkpoint is skipped, and removed (nothing can resume from it; the rerun writes it again when it gets
    there), and the one before it is used.
    """
    ckpts = sorted(Path(trainer_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for path in ckpts:
        try:
            if "global_step" in json.loads((path / "trainer_state.json").read_text()):
                return path
        except (OSError, ValueError):
            pass
        if log is not None:
            log.warning("removed incomplete checkpoint %s (the process was killed while writing it)", path)
        shutil.rmtree(path)
    return None
