"""The judges' persistent answer cache (sqlite), shared by every job and rerun."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from persona_em.judging.prompts import template_hash


class JudgeCache:
    """Persistent answers of judges, shared by every job and rerun: sqlite, one row per (model, mode, template,
    question, answer). Only raw answers are stored (top logprobs / text), so scoring settings can change freely."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=120, check_same_thread=False)  # used by the writer thread
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, raw TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS spend (judge TEXT PRIMARY KEY, usd REAL NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(judge_model: str, mode: str, template: str, question: str, answer: str) -> str:
        blob = json.dumps([judge_model, mode, template_hash(template), question, answer], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key, raw FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
            found.update({k: json.loads(r) for k, r in self.db.execute(q, chunk)})
        return found

    def put(self, key: str, raw: dict, judge: str | None = None, cost: float = 0.0) -> None:
        self.put_many([(key, raw)], judge, cost)

    def put_many(self, items: list[tuple[str, dict]], judge: str | None = None, cost: float = 0.0) -> None:
        """Store answers and, in the same transaction, what they cost (the budget is per judge, over all jobs)."""
        if not items:
            return
        self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)",
                            [(k, json.dumps(raw, ensure_ascii=False)) for k, raw in items])
        if judge is not None and cost:
            self.db.execute("INSERT INTO spend VALUES (?, ?) ON CONFLICT(judge) DO UPDATE SET usd = usd + ?",
                            (judge, cost, cost))
        self.db.commit()

    def spent(self, judge: str) -> float:
        row = self.db.execute("SELECT usd FROM spend WHERE judge = ?", (judge,)).fetchone()
        return row[0] if row else 0.0

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.db.close()
