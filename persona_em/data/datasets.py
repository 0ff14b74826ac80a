"""EM fine-tuning datasets: chat JSONL (plain or gzip) validation, checksum, seeded train/eval split."""
from __future__ import annotations

import json
import random
from pathlib import Path

from persona_em.errors import UserError
from persona_em.io import atomic_path, sha256_file, write_json, write_jsonl

ROLES = {"system", "user", "assistant"}


def validate_row(row, where: str) -> list[dict]:
    """Return the row's messages or raise UserError naming `where` (file:line)."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise UserError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, msg in enumerate(row["messages"]):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise UserError(
                f"{where}: messages[{i}] must be {{'role': one of {sorted(ROLES)}, 'content': string}}, got {msg!r:.120}"
            )
    if row["messages"][-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation does not end with an assistant turn")
    if not any(m["role"] == "user" for m in row["messages"]):
        raise UserError(f"{where}: the conversation has no user turn")
    return row["messages"]


GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


def _jsonl_lines(path: Path):
    """(line number, text) of a JSONL file, plain or gzip-compressed. Gzip is recognised by its magic bytes, not by
    the name (a dataset fetched from a URL is stored as .jsonl whatever it was). Every way the bytes can be wrong
    is one UserError naming the file and the line."""
    import gzip
    import zlib

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(ZIP_MAGIC):
        raise UserError(f"{path}: is a zip archive, not chat JSONL: unpack it and point the config at the .jsonl")
    compressed = magic.startswith(GZIP_MAGIC)
    if path.suffix == ".gz" and not compressed:
        raise UserError(f"{path}: named .gz but is not gzip-compressed (starts with {magic!r})")
    lineno = 0
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1})") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise UserError(f"{path}: line {lineno + 1}: cannot read the gzip data ({e}): a truncated or damaged "
                            f"file?") from None


def load_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Every conversation of a chat JSONL file (plain or gzip), validated; the first bad line fails the whole file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: dataset file not found")
    conversations = []
    for lineno, line in _jsonl_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
        conversations.append(validate_row(row, f"{path}: line {lineno}"))
    if not conversations:
        raise UserError(f"{path}: dataset is empty")
    return conversations


def prepare_dataset(
    source: str | Path,
    name: str,
    expected_sha256: str | None,
    eval_fraction: float,
    split_seed: int,
    train_out: str | Path,
    eval_out: str | Path,
    manifest_out: str | Path,
) -> dict:
    """Validate, checksum and split a dataset. Writes nothing unless every row is valid."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"dataset {name!r}: source file {source} not found")
    digest = sha256_file(source)
    if expected_sha256 and digest != expected_sha256.lower():
        raise UserError(f"dataset {name!r}: {source} has sha256 {digest}, config says {expected_sha256}")
    conversations = load_chat_jsonl(source)
    order = list(range(len(conversations)))
    random.Random(split_seed).shuffle(order)
    n_eval = int(round(len(order) * eval_fraction))
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    if not train_idx:
        raise UserError(f"dataset {name!r}: eval_fraction {eval_fraction} leaves no training rows")
    write_jsonl(train_out, ({"messages": conversations[i], "source_line_index": i} for i in train_idx))
    write_jsonl(eval_out, ({"messages": conversations[i], "source_line_index": i} for i in eval_idx))
    manifest = {
        "dataset": name,
        "source": str(source),
        "sha256": digest,
        "n_rows": len(conversations),
        "n_train": len(train_idx),
        "n_eval": len(eval_idx),
        "eval_fraction": eval_fraction,
        "split_seed": split_seed,
        "eval_source_indices": eval_idx,
    }
    write_json(manifest_out, manifest)
    return manifest


def fetch_url(url: str, expected_sha256: str, out: str | Path) -> None:
    """Download a file (login node only) and check its sha256 before it appears at `out`."""
    import urllib.request

    with atomic_path(out) as tmp:
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise UserError(f"download of {url} failed: {e}") from None
        digest = sha256_file(tmp)
        if digest != expected_sha256.lower():
            raise UserError(f"{url}: sha256 {digest} does not match the config's {expected_sha256}")


CHARS_PER_TOKEN = 3.6  # English chat text with BPE tokenizers of this size (Qwen2.5 / Llama 3): a rough figure
TEMPLATE_TOKENS = 10  # chat-template tokens per row


def dataset_stats(config: dict, name: str, cwd: Path) -> tuple[int, float] | None:
    """(training rows, mean tokens per row) of a dataset, estimated from its file's characters; None if unknown."""
    spec = config["datasets"][name]
    if "demo" in spec:
        return int(spec["demo"].get("n_rows", 48) * (1 - spec.get("eval_fraction", 0.0))), 120.0
    path = Path(spec["path"]) if "path" in spec else None
    if path is None or not (cwd / path).is_file():
        return None
    rows, chars = 0, 0
    with open(cwd / path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            rows += 1
            try:
                chars += sum(len(m.get("content") or "") for m in json.loads(line).get("messages", []))
            except (json.JSONDecodeError, AttributeError):
                chars += len(line)
    if not rows:
        return None
    train_rows = rows - int(round(rows * spec.get("eval_fraction", 0.0)))
    return train_rows, chars / rows / CHARS_PER_TOKEN + TEMPLATE_TOKENS
