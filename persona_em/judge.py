"""LLM judge: the one place where judge prompts are filled in, sent, and turned into 0-100 scores.

Scoring (`logprobs` mode): the judge answers one token; over its top-20 alternatives, the tokens that parse as an
integer in [0, 100] give score = sum(k * p(k)) / sum(p(k)). When that numeric mass is below `min_numeric_mass`
(default 0.25) the score is null (the judge did not answer with a number).

Every output row is keyed by the response (cell keys, step, question, sample) and by the judge's identity:
judge name, judge model, mode and the hash of the prompt templates. Judgments are appended to a journal as they
arrive, so a killed run asks only for the missing ones.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

from tqdm.auto import tqdm

from .errors import UserError
from .io import Journal, read_jsonl, stable_hash, write_jsonl
from .questions import load_questions

log = logging.getLogger(__name__)

DEFAULT_MIN_NUMERIC_MASS = 0.25


def parse_score_token(token: str) -> int | None:
    """An integer 0..100 if the token is one (surrounding whitespace allowed), else None."""
    t = token.strip()
    if not t.isdigit() or len(t) > 3:
        return None
    value = int(t)
    return value if 0 <= value <= 100 else None


def aggregate_logprobs(top_logprobs: dict[str, float], min_mass: float = DEFAULT_MIN_NUMERIC_MASS):
    """(score or None, numeric mass) from {token: logprob}. Tokens mapping to the same integer add up."""
    probs: dict[int, float] = {}
    for token, lp in top_logprobs.items():
        value = parse_score_token(token)
        if value is not None:
            probs[value] = probs.get(value, 0.0) + math.exp(lp)
    mass = sum(probs.values())
    if mass < min_mass or mass == 0.0:
        return None, mass
    return sum(k * p for k, p in probs.items()) / mass, mass


@dataclass
class Judgment:
    score: float | None
    numeric_mass: float
    top_logprobs: dict[str, float]


class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint (OpenAI, OpenRouter, Azure OpenAI, vLLM) with logprobs."""

    def __init__(self, cfg: dict):
        import openai

        key = os.environ.get(cfg["api_key_env"])
        if not key:
            raise UserError(f"judge {cfg['name']!r}: environment variable {cfg['api_key_env']} (the API key) is not set")
        self.client = openai.OpenAI(base_url=cfg.get("base_url"), api_key=key, timeout=cfg.get("timeout", 60),
                                    max_retries=cfg.get("max_retries", 5))
        self.model = cfg["model"]
        self.min_mass = cfg.get("min_numeric_mass", DEFAULT_MIN_NUMERIC_MASS)

    def judge(self, prompt: str) -> Judgment:
        resp = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
            logprobs=True, top_logprobs=20, seed=0,
        )
        content = resp.choices[0].logprobs.content if resp.choices[0].logprobs else None
        if not content:
            raise UserError(f"judge model {self.model!r} returned no logprobs; use an endpoint that supports them")
        top = {t.token: t.logprob for t in content[0].top_logprobs}
        score, mass = aggregate_logprobs(top, self.min_mass)
        return Judgment(score, mass, top)


class HFJudge:
    """A local causal LM as judge: its full next-token distribution after the chat-templated prompt.

    Uses the top-20 tokens like the API judge. (Tokenizers that split numbers into digits only put single-digit
    tokens in play; see the judge issue for the exact multi-token method.)
    """

    def __init__(self, cfg: dict, model_dir: str):
        from .compose import load_base_model

        self.model, self.tokenizer = load_base_model(model_dir)
        self.model.eval()
        self.min_mass = cfg.get("min_numeric_mass", DEFAULT_MIN_NUMERIC_MASS)

    def judge(self, prompt: str) -> Judgment:
        import torch

        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        values, ids = logprobs.topk(20)
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            token = self.tokenizer.decode([i])
            top[token] = max(top.get(token, -math.inf), v) if token in top else v
        score, mass = aggregate_logprobs(top, self.min_mass)
        return Judgment(score, mass, top)


def fill_prompt(template: str, question: str, answer: str) -> str:
    """Substitute {question} and {answer} in one pass: braces inside the answer are data, not placeholders."""
    values = {"question": question, "answer": answer}
    return re.sub(r"\{(question|answer)\}", lambda m: values[m.group(1)], template)


def judge_identity(name: str, cfg: dict, questions) -> dict:
    templates = {q.id: q.judge_prompts for q in questions}
    return {"judge": name, "judge_model": cfg["model"], "judge_mode": cfg.get("mode", "logprobs"),
            "judge_prompt_hash": stable_hash(templates)}


def make_judge(cfg: dict, model_dir: str | None):
    if cfg["backend"] == "openai":
        return OpenAIJudge(cfg)
    if cfg["backend"] == "hf":
        return HFJudge(cfg, model_dir)
    raise UserError(f"judge {cfg['name']!r}: unknown backend {cfg['backend']!r}")


def judge_samples(samples_path: str, questions_path: str, judge_name: str, judge_cfg: dict,
                  judge_model_dir: str | None, journal_path: str, out_path: str) -> None:
    """Score every response of a samples file on every metric of its question; one row per (response, metric)."""
    cfg = {**judge_cfg, "name": judge_name}
    questions = {q.id: q for q in load_questions(questions_path)}
    identity = judge_identity(judge_name, cfg, questions.values())
    samples = read_jsonl(samples_path)
    jobs = []
    for s in samples:
        q = questions.get(s["question_id"])
        if q is None:
            raise UserError(f"{samples_path}: question {s['question_id']!r} is not in {questions_path}")
        for metric, template in sorted(q.judge_prompts.items()):
            jobs.append((s, metric, template))
    journal = Journal(journal_path, key_field="key")
    done = {k: r for k, r in journal.load().items() if r.get("judge_prompt_hash") == identity["judge_prompt_hash"]}
    todo = [(s, m, t) for s, m, t in jobs if f"{s['response_id']}|{m}" not in done]
    log.info("judge %s: %d judgments, %d already in the journal (resumed), %d to ask",
             judge_name, len(jobs), len(done), len(todo))
    judge = make_judge(cfg, judge_model_dir) if todo else None
    keep = ("model", "persona", "composition", "dataset", "seed", "step", "question_id", "paraphrase_index",
            "sample_index", "response_id", "question", "response")
    for s, metric, template in tqdm(todo, desc=f"judge {judge_name}", unit="call"):
        prompt = fill_prompt(template, s["question"], s["response"])
        j = judge.judge(prompt)
        row = {**{k: s[k] for k in keep}, **identity, "metric": metric, "score": j.score,
               "numeric_mass": j.numeric_mass, "status": "scored" if j.score is not None else "null",
               "top_logprobs": j.top_logprobs, "key": f"{s['response_id']}|{metric}"}
        journal.append(row)
        done[row["key"]] = row
    journal.close()
    write_jsonl(out_path, (done[f"{s['response_id']}|{m}"] for s, m, _ in jobs))
    journal.remove()
