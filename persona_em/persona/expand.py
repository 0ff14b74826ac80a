"""expand_prompts: more user messages per trait, from a generator model, with length quotas and dedup.

Per trait and length bucket (short / medium / long), the generator is asked for `request_size` user messages as a
numbered list; the lines that parse are kept unless they duplicate a kept prompt exactly (after normalising case and
spaces) or nearly (word-set Jaccard overlap above `dedup_threshold`, also against the seed questions). Asking repeats
until the bucket's quota is met; after `max_attempts` calls the rule fails naming the trait and bucket. Each call's
raw answer is journaled, so a rerun replays the parsing without asking again. Seeded: call i of a bucket uses a seed
derived from (seed, trait, bucket, i).

Output (JSONL, one row per prompt): constitution, trait_index, trait, bucket (seed|short|medium|long), prompt_id,
prompt.
"""
from __future__ import annotations

import logging
import re

from persona_em.chat import ChatSettings
from persona_em.errors import UserError
from persona_em.io import write_jsonl
from persona_em.persona.constitution import load_constitution
from persona_em.persona.generation import Request, generator_identity, item_seed, make_backend, run_journaled

log = logging.getLogger(__name__)

BUCKETS = ("short", "medium", "long")
_NUMBERED = re.compile(r"^\s*(?:\d+\s*[.):]|\(\d+\)|-\s*\d+\s*[.)])\s*(.+?)\s*$")


def parse_numbered_list(text: str) -> list[str]:
    """Items of a numbered list ("1. ...", "2) ...", "(3) ..."), one per line; surrounding quotes removed."""
    items = []
    for line in text.splitlines():
        m = _NUMBERED.match(line)
        if m:
            item = m.group(1).strip().strip('"“”').strip()
            if item:
                items.append(item)
    return items


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' word sets (0 = disjoint, 1 = the same words)."""
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


class Deduplicator:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.kept: list[str] = []
        self._exact: set[str] = set()

    def add(self, text: str) -> bool:
        """Keep `text` unless it is an exact or near duplicate of something kept; True if kept."""
        norm = _normal(text)
        if norm in self._exact or any(word_overlap(text, k) > self.threshold for k in self.kept):
            return False
        self._exact.add(norm)
        self.kept.append(text)
        return True


def request_messages(template: str, trait: str, seeds: tuple[str, ...], bucket: str, hint: str, n: int) -> list[dict]:
    values = {"trait": trait, "examples": "\n".join(f"- {q}" for q in seeds), "length": bucket, "length_hint": hint,
              "n": str(n)}
    prompt = re.sub(r"\{(trait|examples|length|length_hint|n)\}", lambda m: values[m.group(1)], template)
    return [{"role": "user", "content": prompt}]


def expand_prompts(constitution_path: str, generator: dict, model_dir: str | None, settings: dict,
                   journal_path: str, out_path: str, chat: ChatSettings | None = None) -> None:
    constitution = load_constitution(constitution_path)
    gen_settings = settings["generation"]
    fingerprint = generator_identity(generator, {**gen_settings, "template": settings["template"]}, model_dir, chat)
    backend = None

    def factory():
        nonlocal backend
        backend = backend or make_backend(generator, gen_settings, model_dir, chat=chat)
        return backend

    rows = []
    for t_index, trait in enumerate(constitution.traits):
        dedup = Deduplicator(settings["dedup_threshold"])
        for q_index, q in enumerate(trait.questions):
            if dedup.add(q):
                rows.append(_row(constitution.name, t_index, trait.statement, "seed", f"t{t_index}-seed{q_index}", q))
        for bucket in BUCKETS:
            quota = settings["quotas"][bucket]
            got = 0
            attempt = 0
            while got < quota:
                if attempt >= settings["max_attempts"]:
                    raise UserError(
                        f"expand_prompts {constitution_path}: traits[{t_index}] ({trait.statement[:60]!r}): only "
                        f"{got} of {quota} {bucket} prompts after {attempt} generator calls (max_attempts); raise "
                        "persona_training.expand.max_attempts, lower the quota, or raise dedup_threshold")
                key = f"t{t_index}|{bucket}|{attempt}"
                req = Request(key, request_messages(settings["template"], trait.statement, trait.questions, bucket,
                                                    settings["length_hints"][bucket], settings["request_size"]),
                              item_seed(settings["seed"], t_index, bucket, attempt))
                answer = run_journaled([req], factory, journal_path, fingerprint,
                                       desc=f"expand {constitution.name} {key}")[key]["text"]
                candidates = parse_numbered_list(answer)
                if not candidates:
                    log.warning("%s: the generator's answer had no numbered list item", key)
                for c in candidates:
                    if got < quota and dedup.add(c):
                        rows.append(_row(constitution.name, t_index, trait.statement, bucket,
                                         f"t{t_index}-{bucket}{got}", c))
                        got += 1
                attempt += 1
            log.info("trait %d %s: %d prompts in %d calls", t_index, bucket, got, attempt)
    write_jsonl(out_path, rows)
    log.info("%s: %d prompts for %d traits", constitution.name, len(rows), len(constitution.traits))


def _row(name, t_index, trait, bucket, prompt_id, prompt) -> dict:
    return {"constitution": name, "trait_index": t_index, "trait": trait, "bucket": bucket, "prompt_id": prompt_id,
            "prompt": prompt}
