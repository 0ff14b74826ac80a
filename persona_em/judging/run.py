"""The judge stage: every response of a samples file judged on every metric of its question, with a journal (resume),
the shared cache, bounded concurrency and a budget cap."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from persona_em.errors import UserError
from persona_em.io import Journal, stable_hash, write_jsonl
from persona_em.data.questions import LABEL_TYPE, load_questions
from persona_em.judging.backends import HFBackend, JudgeRequestError, JudgeStopped, make_backend, model_fingerprint
from persona_em.judging.cache import JudgeCache
from persona_em.judging.cost import announce_cost, call_cost, estimate_tokens
from persona_em.judging.identity import JUDGE_DEFAULTS, judge_identity
from persona_em.judging.prompts import clean_answer, fill_prompt, template_hash
from persona_em.judging.scoring import LABEL_MAX_TOKENS, Judgment, interpret, parse_score_token

log = logging.getLogger(__name__)


KEEP = ("model", "persona", "composition", "dataset", "seed", "step", "question_id", "paraphrase_index",
        "sample_index", "response_id", "question", "host", "gpu")  # host/gpu: where the response was generated


@dataclass
class _Job:
    sample: dict
    metric: str
    template: str
    prompt: str
    answer: str
    truncated: bool
    cache_key: str
    key: str
    kind: str  # how the answer is asked for and read: logprobs, text or label (interpret's mode)
    question_type: str
    est_cost: float | None = None
    extra: dict = field(default_factory=dict)

    async def ask(self, backend) -> dict:
        if self.kind == "label":
            return await backend.ask_text(self.prompt, LABEL_MAX_TOKENS)
        return await backend.ask(self.prompt)

    def out_tokens(self, cfg: dict) -> int:
        """The most completion tokens the call can cost."""
        return {"logprobs": 1, "label": LABEL_MAX_TOKENS, "text": cfg["text_max_tokens"]}[self.kind]


def read_samples(path: str) -> list[dict]:
    """Sample rows; bytes that are not UTF-8 become U+FFFD (an answer is data and must never crash the judge)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: samples file not found")
    rows = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    return rows


def judge_samples(samples_path: str, questions_path: str, judge_name: str, judge_cfg: dict,
                  judge_model_dir: str | None, journal_path: str, out_path: str,
                  cache_path: str | None = None, backend=None, judge_key: str | None = None) -> dict:
    """Score every response of a samples file on every metric of its question; one row per (response, metric).

    `judge_key` is the judge's path key (judge_key(); the workflow passes it), written to every row; without it the
    rows carry the name.

    Returns counts {total, journal, cache, asked, retries, errors}. One unreadable answer or one request refused
    for its prompt is an `error` row (the package docstring), and the job goes on. Raises JudgeStopped (a UserError)
    when the run could not finish (budget reached, endpoint unusable, retries exhausted): the journal and cache keep
    every judgment made, the output is not written, and a rerun asks only for the rest.
    """
    cfg = {**JUDGE_DEFAULTS, **judge_cfg, "name": judge_name}
    if cfg["mode"] not in ("logprobs", "text"):
        raise UserError(f"judge {judge_name!r}: unknown mode {cfg['mode']!r} (logprobs or text)")
    questions = {q.id: q for q in load_questions(questions_path)}
    identity = judge_identity(judge_name, cfg, questions.values(), judge_key)
    # Whose answers the cache holds: a local model by its files; an API model by its name and, off the default
    # endpoint, its base_url (endpoints serving one model name can differ: the path key hashes base_url too, and a
    # new endpoint's path must not be filled with the old endpoint's cached answers).
    if cfg["backend"] == "hf" and judge_model_dir:
        ident_model = f"hf:{cfg['model']}:{model_fingerprint(judge_model_dir)}"
        if cfg.get("chat") is not None:  # how its prompts are rendered (persona_em.chat): thinking, template date
            ident_model += f":{stable_hash(cfg['chat'], 8)}"
    else:
        ident_model = f"{cfg['model']}@{cfg['base_url']}" if cfg.get("base_url") else cfg["model"]
    # A text answer is cut at its token limit: a longer limit must not reuse shorter cached answers. A label
    # question's answer is a text answer of LABEL_MAX_TOKENS in any mode (and shares the cache with text mode).
    cache_modes = {"label": f"text:{LABEL_MAX_TOKENS}", "text": f"text:{cfg['text_max_tokens']}",
                   "logprobs": "logprobs"}
    jobs: list[_Job] = []
    for s in read_samples(samples_path):
        q = questions.get(s["question_id"])
        if q is None:
            raise UserError(f"{samples_path}: question {s['question_id']!r} is not in {questions_path}")
        answer, truncated = clean_answer(s.get("response"), cfg["max_answer_chars"])
        question = clean_answer(s.get("question"), cfg["max_answer_chars"])[0]
        full = clean_answer(s.get("response"), sys.maxsize)[0]
        kind = "label" if q.type == LABEL_TYPE else cfg["mode"]
        for metric, template in sorted(q.judge_prompts.items()):
            jobs.append(_Job(s, metric, template, fill_prompt(template, question, answer), answer, truncated,
                             JudgeCache.key(ident_model, cache_modes[kind], template, question, answer),
                             f"{s['response_id']}|{metric}", kind, q.type, extra={"response": full}))

    journal = Journal(journal_path, key_field="key")
    same = {**{f: identity[f] for f in ("judge_key", "judge_model", "judge_mode", "judge_prompt_hash")},
            "min_numeric_mass": cfg["min_numeric_mass"], "max_answer_chars": cfg["max_answer_chars"]}
    # error rows are not resumed: a rerun reads the cached answer again or asks again
    done = {k: r for k, r in journal.load().items()
            if all(r.get(f) == v for f, v in same.items()) and r.get("status") != "error"}
    cache = JudgeCache(cache_path) if cache_path else None
    pending = [j for j in jobs if j.key not in done]
    cached = cache.get_many([j.cache_key for j in pending]) if cache else {}

    def record(job: _Job, raw: dict | None, source: str, error: str | None = None) -> dict:
        """The judged row of one answer; `raw` None with `error`: the request was refused. Never raises: an
        answer that cannot be read is an `error` row with the message."""
        try:
            j = interpret(raw, job.kind, cfg["min_numeric_mass"]) if error is None else Judgment(None, "error")
        except Exception as e:  # noqa: BLE001 - one unreadable answer is one error row, never a dead job
            j, error = Judgment(None, "error"), f"unreadable answer: {type(e).__name__}: {e}"[:500]
            log.warning("judge %s: %s: %s", judge_name, job.key, error)
        raw = raw if isinstance(raw, dict) else {}
        row = {**{k: job.sample.get(k) for k in KEEP}, "response": job.extra["response"], **identity,
               "question_type": job.question_type, "metric": job.metric, "score": j.score, "status": j.status,
               "label": j.label, "error": error, "numeric_mass": j.numeric_mass, "code_mass": j.code_mass,
               "refusal_mass": j.refusal_mass, "top_logprobs": raw.get("top_logprobs"), "judge_text": raw.get("text"),
               "judge_template_hash": template_hash(job.template), "answer_truncated": job.truncated,
               "min_numeric_mass": cfg["min_numeric_mass"], "max_answer_chars": cfg["max_answer_chars"],
               "source": source, "key": job.key}
        done[job.key] = row
        return row

    journal.append_many([record(job, cached[job.cache_key], "cache") for job in pending if job.cache_key in cached])
    missing = [j for j in pending if j.cache_key not in cached]
    same_prompt: dict[str, list[_Job]] = {}  # identical (template, question, answer): asked once
    for j in missing:
        same_prompt.setdefault(j.cache_key, []).append(j)
    todo = [group[0] for group in same_prompt.values()]
    counts = {"total": len(jobs), "journal": len(jobs) - len(pending), "cache": len(pending) - len(missing),
              "asked": 0, "retries": 0}
    log.info("judge %s [%s] (%s, %s, prompts %s): %d judgments; %d resumed from the journal, %d from the cache, "
             "%d to judge with %d calls", judge_name, identity["judge_key"], identity["judge_model"], cfg["mode"],
             identity["judge_prompt_hash"], counts["total"], counts["journal"], counts["cache"], len(missing),
             len(todo))
    try:
        if todo:
            announce_cost(cfg, todo)
            backend = backend or make_backend(cfg, judge_model_dir)
            writer = _GroupWriter(journal, cache, judge_name)
            asked, retries = asyncio.run(_ask_all(backend, cfg, todo, same_prompt, writer, record, len(jobs),
                                                  len(jobs) - len(missing)))
            counts.update(asked=asked, retries=retries)
    finally:
        journal.close()
        if cache:
            cache.close()
    if cfg["mode"] == "logprobs" and cfg["backend"] != "hf":
        _warn_if_digit_split(cfg["name"], [done[j.key] for j in jobs])
    write_jsonl(out_path, (done[j.key] for j in jobs))
    journal.remove()
    counts["errors"] = sum(done[j.key]["status"] == "error" for j in jobs)
    log.info("judge %s: wrote %d rows to %s (%d asked, %d retries, %d error rows)", judge_name, len(jobs), out_path,
             counts["asked"], counts["retries"], counts["errors"])
    if counts["errors"]:
        log.warning("judge %s: %d judgments are error rows (status 'error', message in 'error'): excluded from "
                    "every statistic, counted in the status rates; a rerun of the job asks for them again",
                    judge_name, counts["errors"])
    return counts


def _warn_if_digit_split(name: str, rows: list[dict]) -> None:
    """A judge whose tokenizer splits numbers into digits answers '7' for 70 too: its first-token logprobs read
    only the first digit. Warn when numbers were seen but never one with two digits."""
    numeric = [t for r in rows for t in (r.get("top_logprobs") or {}) if parse_score_token(t) is not None]
    if len(rows) >= 20 and numeric and not any(len(t.strip()) > 1 for t in numeric):
        log.warning("judge %s: its top logprobs hold only single-digit numbers: the judge model's tokenizer seems "
                    "to split numbers into digits, so the first token cannot tell 7 from 70. Use mode: text, or "
                    "the hf backend (exact multi-token expected value)", name)


class _GroupWriter:
    """Journal rows and cache entries of finished calls, written by a background thread a few times per second
    with one fsync / one commit per batch (one fsync per call would cap throughput at the disk's sync rate).
    A SIGKILL loses at most the last interval's judgments; they are asked again on rerun."""

    INTERVAL = 0.25

    def __init__(self, journal: Journal, cache: JudgeCache | None, judge: str):
        self.journal, self.cache, self.judge = journal, cache, judge
        self.rows: list[dict] = []
        self.items: list[tuple[str, dict]] = []
        self.cost = 0.0

    def add(self, rows: list[dict], cache_key: str | None, raw: dict | None, cost: float) -> None:
        """Rows for the journal and, unless cache_key is None (a refused request: never cached), the answer."""
        self.rows.extend(rows)
        if cache_key is not None:
            self.items.append((cache_key, raw))
        self.cost += cost

    def _write(self, rows, items, cost) -> None:
        if self.cache is not None:
            self.cache.put_many(items, self.judge, cost)  # cache first: a journal row always has its answer cached
        self.journal.append_many(rows)

    async def flush(self) -> None:
        rows, items, cost = self.rows, self.items, self.cost
        self.rows, self.items, self.cost = [], [], 0.0
        if rows:
            await asyncio.to_thread(self._write, rows, items, cost)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.INTERVAL)
            except asyncio.TimeoutError:
                pass
            await self.flush()


async def _ask_all(backend, cfg: dict, todo: list[_Job], same_prompt: dict, writer: _GroupWriter, record,
                   total: int, initial: int):
    """Ask for every job with at most `concurrency` in flight. On a stop (budget, fatal error) the calls in
    flight still finish and are recorded; nothing judged is lost."""
    concurrency = 1 if isinstance(backend, HFBackend) else max(1, int(cfg["concurrency"]))
    per_call = getattr(backend, "max_prompts_per_call", 1)  # a local judge answers many prompts per call (ask_many)
    queue = list(reversed(todo))
    state = {"spent": writer.cache.spent(cfg["name"]) if writer.cache is not None else 0.0, "reserved": 0.0,
             "asked": 0, "stop": None}
    budget = cfg.get("budget_usd")
    bar = tqdm(total=total, initial=initial, desc=f"judge {cfg['name']}", unit="call", smoothing=0.1)

    async def worker():
        while queue and state["stop"] is None:
            jobs = []
            while queue and len(jobs) < per_call:
                job = queue.pop()
                if jobs and job.kind == "label":  # label answers are generated one at a time (ask_text)
                    queue.append(job)
                    break
                if budget is not None and job.est_cost is not None:
                    if state["spent"] + state["reserved"] + job.est_cost > budget:
                        state["stop"] = state["stop"] or JudgeStopped(
                            f"judge {cfg['name']!r}: budget cap ${budget} reached after ${state['spent']:.4f}; "
                            f"everything judged so far is kept in the journal and cache: raise "
                            f"judges.{cfg['name']}.budget_usd and rerun to judge the rest")
                        queue.append(job)
                        break
                    state["reserved"] += job.est_cost
                jobs.append(job)
                if job.kind == "label":
                    break
            if not jobs:
                return
            try:
                if per_call == 1 or jobs[0].kind == "label":  # one prompt per call (API backends, labels)
                    raws = [await jobs[0].ask(backend)]
                else:
                    raws = await backend.ask_many([j.prompt for j in jobs])
            except JudgeRequestError as e:  # refused for this prompt alone: error rows, the run goes on
                for job in jobs:
                    log.warning("judge %s: request refused for %s: %s", cfg["name"], job.key, e)
                    group = same_prompt[job.cache_key]
                    writer.add([record(j, None, "asked", error=f"request refused: {e}") for j in group], None, None,
                               0.0)
                    state["asked"] += 1
                    bar.update(len(group))
                continue
            except Exception as e:  # noqa: BLE001 - any other failure stops the run cleanly
                state["stop"] = state["stop"] or e
                return
            finally:
                if budget is not None:
                    state["reserved"] -= sum(j.est_cost for j in jobs if j.est_cost is not None)
            for job, raw in zip(jobs, raws):
                cost = call_cost(cfg, raw.get("prompt_tokens") or estimate_tokens(job.prompt),
                                 raw.get("completion_tokens") or 1)
                state["spent"] += cost or 0.0
                group = same_prompt[job.cache_key]
                writer.add([record(j, raw, "asked") for j in group], job.cache_key, raw, cost or 0.0)
                state["asked"] += 1
                bar.update(len(group))

    finished = asyncio.Event()
    flusher = asyncio.create_task(writer.run(finished))
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        finished.set()
        await flusher
        await writer.flush()  # everything judged is on disk before any error is raised
        bar.close()
        await backend.aclose()
    retries = getattr(backend, "retries", 0)
    if state["stop"] is not None:
        left = len(todo) - state["asked"]
        log.error("judge %s stopped: %d calls made in this run, %d calls left (kept: journal and cache)",
                  cfg["name"], state["asked"], left)
        raise state["stop"]
    return state["asked"], retries
