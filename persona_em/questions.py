"""Evaluation question sets in the Emergent Misalignment paper's YAML format.

A YAML list of items:
  id: str                        (required, unique)
  type: str                      (e.g. free_form_judge_0_100)
  paraphrases: [str, ...]        (required; user messages; one is drawn per sample with a seeded RNG)
  samples_per_paraphrase: int    (default for the number of samples per question)
  system: str                    (optional system prompt; applied when present)
  judge: str                     (the judge model the paper used; informational here)
  judge_prompts: {metric: template with {question} and {answer}}
YAML anchors/aliases share judge prompts between items (PyYAML resolves them). Templates follow str.format
conventions ({{ and }} are literal braces), as in the EM paper's judge code.
Extra metrics (e.g. the Model Organisms repository's `medical`, `financial`, `bad_stuff`) are more judge_prompts.
Keys other than the above are kept out of the Question but logged, so nothing is silently misread.

The canonical files (the EM paper's evaluation/*.yaml) are referenced in config by {url, sha256} and downloaded on
the login node by the fetch_questions rule (`fetch_questions` below); their text is not part of this repository.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

log = logging.getLogger(__name__)
KNOWN_KEYS = {"id", "type", "paraphrases", "samples_per_paraphrase", "system", "judge", "judge_prompts"}


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: dict = field(hash=False)
    system: str | None = None
    type: str = "free_form_judge_0_100"
    samples_per_paraphrase: int | None = None

    def messages(self, paraphrase_index: int) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.paraphrases[paraphrase_index]}]


def load_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: question file not found")
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty YAML list of questions")
    questions, seen = [], set()
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping")
        qid = item.get("id")
        if not isinstance(qid, str) or not qid:
            raise UserError(f"{where}: missing 'id'")
        where = f"{path}: question {qid!r}"
        if qid in seen:
            raise UserError(f"{where}: duplicate id")
        seen.add(qid)
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) for p in paraphrases):
            raise UserError(f"{where}: 'paraphrases' must be a non-empty list of strings")
        unknown = sorted(set(item) - KNOWN_KEYS)
        if unknown:
            log.warning("%s: keys %s are not used by this workflow", where, ", ".join(unknown))
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        spp = item.get("samples_per_paraphrase")
        if spp is not None and (not isinstance(spp, int) or spp < 1):
            raise UserError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
        prompts = item.get("judge_prompts") or {}
        if not isinstance(prompts, dict):
            raise UserError(f"{where}: 'judge_prompts' must map metric names to templates")
        for metric, template in prompts.items():
            if not isinstance(template, str) or "{answer}" not in template.replace("{{", ""):
                raise UserError(f"{where}: judge prompt {metric!r} has no {{answer}} placeholder")
        questions.append(Question(
            id=qid, paraphrases=tuple(paraphrases), judge_prompts=dict(prompts), system=item.get("system"),
            type=item.get("type", "free_form_judge_0_100"), samples_per_paraphrase=item.get("samples_per_paraphrase"),
        ))
    return questions


@dataclass(frozen=True)
class SampleItem:
    question_id: str
    paraphrase_index: int
    sample_index: int


def sample_plan(questions: list[Question], n_samples: int, seed: int) -> list[SampleItem]:
    """Which paraphrase each of the n samples of each question uses: seeded, independent of batching and resume."""
    plan = []
    for q in questions:
        rng = random.Random(f"{seed}:{q.id}")
        for s in range(n_samples):
            plan.append(SampleItem(q.id, rng.randrange(len(q.paraphrases)), s))
    return plan


def fetch_questions(url: str, sha256: str, out: str | Path) -> None:
    """Download a canonical question file (login node), check its sha256, and check that it parses."""
    from .data import fetch_url

    fetch_url(url, sha256, out)
    try:
        load_questions(out)
    except UserError as e:
        Path(out).unlink(missing_ok=True)
        raise UserError(f"{url}: downloaded question file is not in the EM paper's format: {e}") from None
