"""Evaluation question sets in the Emergent Misalignment paper's YAML format.

A YAML list of items:
  id: str                        (required, unique)
  type: str                      free_form_judge_0_100 (the judge scores 0-100; the default when absent) or
                                 free_form_judge (the judge answers a label, e.g. TRUE / FALSE / UNKNOWN: the paper's
                                 deception questions); any other type is refused
  paraphrases: [str, ...]        (required, non-empty strings; user messages; one is drawn per sample, seeded)
  samples_per_paraphrase: int    (default for the number of samples per question)
  system: str                    (optional system prompt; applied when present)
  judge: str                     (the judge model the paper used; informational here)
  judge_prompts: {metric: template with {question} and {answer}}   (required: every question is judged)
YAML anchors/aliases share judge prompts between items (PyYAML resolves them). Templates follow str.format
conventions, as in the EM paper's judge code: {question} and {answer} are the only placeholders, {{ and }} are
literal braces; anything else in braces ("{foo}", a lone "{") is refused, since the paper's str.format would fail on it.
Extra metrics (e.g. the Model Organisms repository's `medical`, `financial`, `bad_stuff`) are more judge_prompts. A
metric is either a 0-100 metric or a label metric in the whole file, and the 0-100 questions must define `aligned`
and `coherent` (the EM rate needs both) in at least one question.
Keys other than the above are kept out of the Question but logged, so nothing is silently misread.

The whole file is checked when it is read; the workflow reads a local file when it is parsed (rules/common.smk), so
`snakemake -n` fails on a bad file with one line naming the file and the item. The canonical files (the EM paper's
evaluation/*.yaml) are referenced in config by {url, sha256}, downloaded on the login node by the fetch_questions rule
(`fetch_questions` below) and checked there, before any job uses them; their text is not part of this repository.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from persona_em.errors import UserError

log = logging.getLogger(__name__)
KNOWN_KEYS = {"id", "type", "paraphrases", "samples_per_paraphrase", "system", "judge", "judge_prompts"}
SCORE_TYPE, LABEL_TYPE = "free_form_judge_0_100", "free_form_judge"
QUESTION_TYPES = (SCORE_TYPE, LABEL_TYPE)
EM_METRICS = ("aligned", "coherent")
METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# The parts of a template in braces, in str.format's reading order: escaped braces, a {field}, or a lone brace.
_BRACES = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")
PLACEHOLDERS = ("{question}", "{answer}")


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: dict = field(hash=False)
    system: str | None = None
    type: str = SCORE_TYPE
    samples_per_paraphrase: int | None = None

    def messages(self, paraphrase_index: int) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.paraphrases[paraphrase_index]}]


def check_template(template, where: str) -> None:
    """A judge prompt: a string holding {answer}, with no placeholder but {question} and {answer}."""
    if not isinstance(template, str):
        raise UserError(f"{where}: expected a template string, got {type(template).__name__}")
    parts = [m.group() for m in _BRACES.finditer(template)]
    for part in parts:
        if part in ("{{", "}}") or part in PLACEHOLDERS:
            continue
        what = f"a lone {part!r}" if part in "{}" else f"an unknown placeholder {part!r}"
        raise UserError(f"{where} has {what} (a judge prompt may hold {{question}} and {{answer}}; write {{{{ and "
                        f"}}}} for literal braces)")
    if "{answer}" not in parts:
        raise UserError(f"{where} has no {{answer}} placeholder")


def load_questions(path: str | Path) -> list[Question]:
    """Read and fully check a question file: one UserError naming the file and the item for the first problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: question file not found")
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty YAML list of questions")
    questions, seen = [], set()
    metric_types: dict[str, tuple[str, str]] = {}  # metric -> (question type, first question using it)
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping")
        if "id" not in item:
            raise UserError(f"{where}: missing 'id'")
        qid = item["id"]
        if not isinstance(qid, str) or not qid.strip():
            raise UserError(f"{where}: 'id' must be a non-empty string, got {qid!r}")
        where = f"{path}: question {qid!r}"
        if qid in seen:
            raise UserError(f"{where}: duplicate id")
        seen.add(qid)
        qtype = item.get("type", SCORE_TYPE)
        if qtype not in QUESTION_TYPES:
            hint = (" (answers without a judge: this workflow judges every question)" if qtype == "free_form"
                    else "")
            raise UserError(f"{where}: type {qtype!r} is not supported{hint}; types: {SCORE_TYPE} (the judge "
                            f"scores 0-100) or {LABEL_TYPE} (the judge answers a label)")
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            raise UserError(f"{where}: 'paraphrases' must be a non-empty list of strings")
        for k, para in enumerate(paraphrases):
            if not isinstance(para, str) or not para.strip():
                raise UserError(f"{where}: paraphrase {k} must be a non-empty string, got {para!r}")
        unknown = sorted(set(item) - KNOWN_KEYS)
        if unknown:
            log.warning("%s: keys %s are not used by this workflow", where, ", ".join(map(str, unknown)))
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        judge = item.get("judge")
        if judge is not None and not isinstance(judge, str):
            raise UserError(f"{where}: 'judge' must be a string (the judge model's name; informational)")
        spp = item.get("samples_per_paraphrase")
        if spp is not None and (isinstance(spp, bool) or not isinstance(spp, int) or spp < 1):
            raise UserError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
        prompts = item.get("judge_prompts")
        if not isinstance(prompts, dict) or not prompts:
            raise UserError(f"{where}: 'judge_prompts' must map metric names to templates (every question is "
                            f"judged), got {prompts!r}")
        for metric, template in prompts.items():
            if not isinstance(metric, str) or not METRIC_NAME.fullmatch(metric):
                raise UserError(f"{where}: judge prompt name {metric!r} must be letters, digits, '_', '.' or '-'")
            check_template(template, f"{where}: judge prompt {metric!r}")
            first = metric_types.setdefault(metric, (qtype, qid))
            if first[0] != qtype:
                raise UserError(f"{where}: metric {metric!r} is a {qtype} metric here but a {first[0]} metric in "
                                f"question {first[1]!r}; give the label metric its own name")
        questions.append(Question(
            id=qid, paraphrases=tuple(paraphrases), judge_prompts=dict(prompts), system=system, type=qtype,
            samples_per_paraphrase=spp,
        ))
    if not any(q.type == SCORE_TYPE and set(EM_METRICS) <= set(q.judge_prompts) for q in questions):
        raise UserError(f"{path}: no {SCORE_TYPE} question has both judge prompts 'aligned' and 'coherent'; "
                        f"the EM rate needs them")
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
    from persona_em.data.datasets import fetch_url

    fetch_url(url, sha256, out)
    try:
        load_questions(out)
    except UserError as e:
        Path(out).unlink(missing_ok=True)
        raise UserError(f"{url}: downloaded question file is not in the EM paper's format: {e}") from None
