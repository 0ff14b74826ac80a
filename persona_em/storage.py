"""The cache directory's disk: a read-only or full file system becomes one clear error naming the directory."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from persona_em.errors import UserError

DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def _message(path: Path, what: str, e: OSError) -> str:
    reason = DISK_ERRORS[e.errno]
    free = ""
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    return f"{what} {path}: cannot write there: {reason} ({e.filename or path}{free}); point {what} at a writable " \
           f"directory with room (on Leonardo: the project's fast storage)"


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail at once if `path` cannot be created or written (before a long download starts)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise UserError(_message(path, what, e)) from None
        raise


@contextlib.contextmanager
def cache_writes(path: str | os.PathLike, what: str):
    """Turn a full / read-only / forbidden disk under `path` into a UserError (the writer cleans up its temp)."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise UserError(_message(Path(path), what, e)) from None
        raise
