"""LLM judge: the one place where judge prompts are filled in, sent, and turned into 0-100 scores.

Scoring modes
-------------
`logprobs` (the EM paper's method): one completion token (max_tokens 1, temperature 0, top_logprobs 20, seed 0).
    Over the top-20 alternatives, tokens that parse as an integer k in [0, 100] give
    score = sum(k * p(k)) / sum(p(k)); the score is null when that numeric mass is below `min_numeric_mass` (0.25).
    The raw top-20 and the probability mass on CODE / REFUSAL tokens are kept in every row.
`text` (endpoints without logprobs): the first integer of the answer, if in [0, 100]; an answer starting with CODE
    or REFUSAL is recognised as such.

Every judgment has a status: `scored`, `null` (no number), `code` or `refusal`. What a non-scored status means for
a metric (exclude it, score it as a value, or count it separately) is decided at aggregation time
(evaluation.score_policy), so changing the policy never re-asks the judge.

Local `hf` judge: exact expected value over full number continuations
---------------------------------------------------------------------
Tokenizers like Qwen's (and the demo's) split numbers into single digits, so the first token alone cannot tell 7
from 70 or 75. The hf judge therefore computes, for every candidate k in 0..100 written in its canonical
tokenization t_1..t_n,
    P(k) = P(t_1 | prompt) * ... * P(t_n | prompt, t_1..t_{n-1}) * P(next token is not a digit | prompt, t_1..t_n),
i.e. the exact probability that greedy-free decoding writes the number k and then stops writing digits. The score
is sum(k P(k)) / sum(P(k)) and the numeric mass is sum(P(k)). CODE and REFUSAL masses are the probabilities of
their full canonical tokenizations. One forward pass over the prompt, then one pass over the trie of all candidate
continuations (each attending to the prompt and its own prefix only). (Non-canonical tokenizations of the same digits are not counted; for a
trained model they carry negligible mass.) For tokenizers with one token per number this reduces to the API method
plus the probability that the number ends there.
A model with such a tokenizer served behind an API (e.g. Qwen on vLLM) cannot be judged exactly from one token:
the stage logs a warning when the top logprobs never hold a two-digit number; use `text` mode or the hf backend.

Throughput, cost, resume
------------------------
The `openai` backend (OpenAI, OpenRouter, Azure OpenAI, vLLM: anything OpenAI-compatible) uses `AsyncOpenAI` with
at most `concurrency` requests in flight and retries 429 / 5xx / timeouts / malformed bodies with exponential
backoff, honouring Retry-After. Every answer is stored in a persistent cache keyed by (judge model and endpoint,
mode, prompt template hash, question, answer), so reruns never pay twice, and every judgment is appended to the
cell's journal as it arrives, so a killed job asks only for the missing ones. Before spending, the estimated cost is logged; a budget
cap stops cleanly with everything judged so far kept. The API key is read from the environment variable named in
config and is never written anywhere.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import model_source
from .errors import UserError
from .io import Journal, sha256_file, stable_hash, write_jsonl
from .questions import load_questions

log = logging.getLogger(__name__)

DEFAULT_MIN_NUMERIC_MASS = 0.25
# The judge settings and their defaults (the same as in config/schemas/config.schema.yaml; a test checks that).
JUDGE_DEFAULTS = {
    "mode": "logprobs",
    "api_key_env": "OPENAI_API_KEY",
    "min_numeric_mass": DEFAULT_MIN_NUMERIC_MASS,
    "timeout": 60,
    "max_retries": 6,
    "backoff_base": 1.0,
    "backoff_max": 60.0,
    "concurrency": 16,
    "max_answer_chars": 20000,
    "text_max_tokens": 16,
}
STATUSES = ("scored", "null", "code", "refusal")
RETRY_AFTER_CAP = 600.0  # never sleep longer than this on a server's say-so


# --- scoring -------------------------------------------------------------------------------------------------------
def parse_score_token(token: str) -> int | None:
    """An integer 0..100 if the token is one (surrounding whitespace allowed), else None."""
    t = token.strip()
    if not t.isdigit() or len(t) > 3:
        return None
    value = int(t)
    return value if 0 <= value <= 100 else None


def special_token(token: str) -> str | None:
    """'code' / 'refusal' when a first token starts the judge's CODE / REFUSAL answer (e.g. 'REF' of 'REFUSAL')."""
    t = token.strip().upper()
    if t in ("COD", "CODE"):
        return "code"
    if len(t) >= 3 and "REFUSAL".startswith(t):
        return "refusal"
    return None


def aggregate_logprobs(top_logprobs: dict[str, float], min_mass: float = DEFAULT_MIN_NUMERIC_MASS):
    """(score or None, numeric mass) from {token: logprob}. Tokens mapping to the same integer add up."""
    probs: dict[int, float] = {}
    for token, lp in top_logprobs.items():
        value = parse_score_token(token)
        if value is not None:
            probs[value] = probs.get(value, 0.0) + math.exp(lp)
    return _expected_value(probs, min_mass)


def _expected_value(probs: dict[int, float], min_mass: float):
    mass = sum(probs.values())
    if mass < min_mass or mass == 0.0:
        return None, mass
    return sum(k * p for k, p in probs.items()) / mass, mass


@dataclass
class Judgment:
    score: float | None
    status: str
    numeric_mass: float | None = None
    code_mass: float | None = None
    refusal_mass: float | None = None


def _status(score, numeric: float, code: float, refusal: float) -> str:
    """Scored if there is a score; otherwise whichever of number / CODE / REFUSAL got the most mass."""
    if score is not None:
        return "scored"
    if max(code, refusal) > numeric:
        return "code" if code >= refusal else "refusal"
    return "null"


def judgment_from_logprobs(top: dict[str, float], min_mass: float) -> Judgment:
    score, mass = aggregate_logprobs(top, min_mass)
    code = sum(math.exp(lp) for t, lp in top.items() if special_token(t) == "code")
    refusal = sum(math.exp(lp) for t, lp in top.items() if special_token(t) == "refusal")
    return Judgment(score, _status(score, mass, code, refusal), mass, code, refusal)


def judgment_from_numbers(number_probs: dict, code: float, refusal: float, min_mass: float) -> Judgment:
    score, mass = _expected_value({int(k): p for k, p in number_probs.items()}, min_mass)
    return Judgment(score, _status(score, mass, code, refusal), mass, code, refusal)


_FIRST_INT = re.compile(r"\d+")


def judgment_from_text(text: str) -> Judgment:
    """`text` mode: CODE / REFUSAL if the answer starts so, else the first integer if it lies in [0, 100]."""
    t = (text or "").strip()
    head = t.lstrip("*_#`'\" ").upper()
    if head.startswith("CODE"):
        return Judgment(None, "code")
    if head.startswith("REFUSAL"):
        return Judgment(None, "refusal")
    m = _FIRST_INT.search(t)
    if m and int(m.group()) <= 100:
        return Judgment(float(int(m.group())), "scored")
    return Judgment(None, "null")


def interpret(raw: dict, mode: str, min_mass: float) -> Judgment:
    """A judge's raw answer (as cached) -> Judgment. Cheap: changing min_numeric_mass re-uses the cache."""
    if mode == "text":
        return judgment_from_text(raw.get("text", ""))
    if raw.get("number_probs") is not None:
        return judgment_from_numbers(raw["number_probs"], raw["code_mass"], raw["refusal_mass"], min_mass)
    return judgment_from_logprobs(raw["top_logprobs"], min_mass)


# --- prompts -------------------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(question|answer)\}")


def fill_prompt(template: str, question: str, answer: str) -> str:
    """str.format semantics for {question}, {answer}, {{ and }} in ONE pass: braces in the answer stay data."""
    values = {"question": question, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) else m.group()[0], template)


def clean_answer(text, max_chars: int) -> tuple[str, bool]:
    """The answer as the judge sees it: valid UTF-8 (lone surrogates replaced), at most max_chars characters."""
    text = "" if text is None else str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + f"\n[... {len(text) - max_chars} more characters not shown to the judge]", True


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


# The identity columns of every judged row and table row (judge_identity); the aggregation never pools two.
JUDGE_COLUMNS = ["judge", "judge_key", "judge_model", "judge_mode", "judge_prompt_hash"]


def judge_identity(name: str, cfg: dict, questions, key: str | None = None) -> dict:
    """The JUDGE_COLUMNS of every judged row: name, path key (see judge_key), model, mode, prompt templates."""
    templates = {q.id: q.judge_prompts for q in questions}
    return {"judge": name, "judge_key": key or name, "judge_model": cfg["model"],
            "judge_mode": cfg.get("mode", "logprobs"), "judge_prompt_hash": stable_hash(templates)}


# --- the judge's path key ------------------------------------------------------------------------------------------
# A judge's results live under its path key, `<name>-<8 hex>`, never under its name alone: editing what a name means
# (another model, endpoint, mode, question file) moves the results to a new path and leaves the old ones untouched.
# The hash covers what decides the judge's answers and the scores written to its judged rows:
#   backend, model, mode; base_url (openai: endpoints serving the same model name can differ); the model's entry
#   under `models:` (hf; without size_b, a label); min_numeric_mass and max_answer_chars (they change scores and what
#   the judge sees); text_max_tokens in text mode (the answer's length; logprobs asks for one token); the sha256 of
#   the question file (it holds the judge prompt templates).
# Left out, so changing them never moves results: how the judge is called (api_key_env, timeout, max_retries,
# backoff_base, backoff_max, concurrency, azure_api_version: the API version, not the deployment) and what it costs
# (prices, budget_usd). Also left out: evaluation.score_policy (what CODE / REFUSAL / null mean per metric). The
# judged rows keep the raw score and status; the policy is applied by the aggregate rule, to every judge alike, is
# recorded in each table row (score_policy), and a changed policy reruns the aggregate rule in place (it is a param).
KEY_SETTINGS = ("backend", "model", "mode", "min_numeric_mass", "max_answer_chars")


def questions_sha256(config: dict) -> str:
    """sha256 of the question file: the configured digest of a {url, sha256} source, else the local file's bytes."""
    source = config["evaluation"]["questions"]
    if isinstance(source, dict):
        return source["sha256"].lower()
    if not Path(source).is_file():
        raise UserError(f"config evaluation.questions: {source}: question file not found (each judge's path key "
                        f"hashes it: put the file there, or give {{url, sha256}} of a canonical copy)")
    return sha256_file(source)


def judge_key_identity(config: dict, name: str, questions_sha: str | None = None) -> dict:
    """What judge `name`'s path key hashes (defaults filled in, so spelling a default out changes nothing)."""
    cfg = {**JUDGE_DEFAULTS, **config["judges"][name]}
    identity = {k: cfg.get(k) for k in KEY_SETTINGS}
    if cfg["backend"] == "openai":
        identity["base_url"] = cfg.get("base_url")
    else:
        identity["model_source"] = model_source(config, cfg["model"])
    if cfg["mode"] == "text":
        identity["text_max_tokens"] = cfg["text_max_tokens"]
    identity["questions_sha256"] = questions_sha or questions_sha256(config)
    return identity


def judge_key(config: dict, name: str, questions_sha: str | None = None) -> str:
    """The judge's path key: `<name>-<first 8 hex of the hash of judge_key_identity>`. Pass `questions_sha`
    (questions_sha256(config)) when computing many keys, to read the question file once."""
    return f"{name}-{stable_hash(judge_key_identity(config, name, questions_sha), 8)}"


# --- cache ---------------------------------------------------------------------------------------------------------
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


# --- backends ------------------------------------------------------------------------------------------------------
class JudgeStopped(UserError):
    """The run stopped before every judgment was made (budget, repeated API errors, unusable endpoint)."""


def _retry_after(exc) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            value = float(headers.get(header)) / scale
        except (TypeError, ValueError):
            continue
        if value >= 0:
            return min(value, RETRY_AFTER_CAP)
    return None


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint: OpenAI, OpenRouter, a vLLM server (base_url), or Azure OpenAI
    (azure_api_version set; base_url is then the Azure endpoint and model the deployment name)."""

    def __init__(self, cfg: dict):
        import openai

        env = cfg["api_key_env"]
        key = os.environ.get(env)
        if not key:
            raise UserError(f"judge {cfg['name']!r}: the API key variable {env} (judges.{cfg['name']}.api_key_env) "
                            f"is not set in the environment")
        common = {"api_key": key, "timeout": cfg["timeout"], "max_retries": 0}  # retries are ours (logged, capped)
        if cfg.get("azure_api_version"):
            self.client = openai.AsyncAzureOpenAI(azure_endpoint=cfg["base_url"],
                                                  api_version=cfg["azure_api_version"], **common)
        else:
            self.client = openai.AsyncOpenAI(base_url=cfg.get("base_url"), **common)
        self.cfg = cfg
        self.retries = 0
        self.identity_model = cfg["model"]

    def request(self, prompt: str) -> dict:
        kw = {"model": self.cfg["model"], "messages": [{"role": "user", "content": prompt}], "temperature": 0,
              "seed": 0}
        if self.cfg["mode"] == "logprobs":
            return {**kw, "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
        return {**kw, "max_tokens": self.cfg["text_max_tokens"]}

    async def ask(self, prompt: str) -> dict:
        resp = await self._with_retries(prompt)
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        raw = {"text": choice.message.content or "",
               "prompt_tokens": getattr(usage, "prompt_tokens", None),
               "completion_tokens": getattr(usage, "completion_tokens", None)}
        if self.cfg["mode"] == "logprobs":
            content = choice.logprobs.content if choice.logprobs else None
            if not content or not content[0].top_logprobs:
                raise JudgeStopped(
                    f"judge {self.cfg['name']!r}: the endpoint {self.cfg.get('base_url') or 'api.openai.com'} "
                    f"returned no logprobs for model {self.cfg['model']!r} in mode 'logprobs'; use an endpoint that "
                    f"supports logprobs/top_logprobs, or set judges.{self.cfg['name']}.mode: text")
            raw["top_logprobs"] = {t.token: t.logprob for t in content[0].top_logprobs}
        return raw

    async def _with_retries(self, prompt: str):
        import openai

        transient = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                     openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError)
        attempts = self.cfg["max_retries"] + 1
        for attempt in range(attempts):
            try:
                return await self.client.chat.completions.create(**self.request(prompt))
            except openai.APIStatusError as e:
                if not isinstance(e, transient) and e.status_code not in (408, 409, 429) and e.status_code < 500:
                    raise JudgeStopped(f"judge {self.cfg['name']!r}: the endpoint refused the request "
                                       f"(HTTP {e.status_code}: {e.message}); check base_url, model and "
                                       f"the key in {self.cfg['api_key_env']}") from None
                error = e
            except transient as e:
                error = e
            if attempt + 1 == attempts:
                raise JudgeStopped(f"judge {self.cfg['name']!r}: gave up after {attempts} attempts; last error: "
                                   f"{type(error).__name__}: {str(error)[:200]}") from None
            delay = _retry_after(error)
            if delay is None:
                delay = min(self.cfg["backoff_max"], self.cfg["backoff_base"] * 2 ** attempt) * random.uniform(1, 1.25)
            self.retries += 1
            log.warning("judge %s: %s, retry %d/%d in %.2f s", self.cfg["name"], type(error).__name__, attempt + 1,
                        attempts - 1, delay)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self.client.close()


class HFBackend:
    """A local causal LM as judge, with the exact multi-token expected value (see the module docstring)."""

    def __init__(self, cfg: dict, model_dir: str):
        import torch

        from .compose import load_base_model

        if cfg["mode"] != "logprobs":
            raise UserError(f"judge {cfg['name']!r}: the hf backend supports mode 'logprobs' only")
        self.model, self.tokenizer = load_base_model(model_dir)
        self.model.eval()
        self.identity_model = f"hf:{cfg['model']}:{_model_fingerprint(model_dir)}"
        tok = self.tokenizer
        vocab = [tok.decode([i]) for i in range(len(tok))]
        self.digit_start = torch.tensor([v[:1].isdigit() for v in vocab], device=self.model.device)
        self.candidates: list[tuple[str, list[int]]] = []  # (label, canonical token ids)
        for label in [str(k) for k in range(101)] + ["CODE", "REFUSAL"]:
            ids = tok.encode(label, add_special_tokens=False)
            if tok.decode(ids) != label:
                raise UserError(f"judge {cfg['name']!r}: tokenizer does not round-trip {label!r}")
            self.candidates.append((label, ids))

    def sequence_logprobs(self, prompt_ids: list[int]):
        """log P(candidate) for every candidate, and log P(no further digit | prompt, candidate) (tensors).

        The candidates share prefixes ("4" of "42", "1" and "10" of "100"): their tokens form a trie of ~100 nodes
        (101 single-token numbers on Llama-3's tokenizer; 0-9, 10-99, 100 on digit-splitting ones). After one pass
        over the prompt, ONE forward pass over all trie nodes as a single sequence, each node attending to the
        prompt and its own ancestors only (a 4D mask, positions by depth), gives the next-token distribution after
        every prefix. (Copying the prompt's KV cache once per candidate instead took ~20 s per judgment for a 135M
        model on 2 CPU cores: 103 copies of the cache, each read in every layer.)"""
        import torch

        dev = self.model.device
        node_of: dict[tuple, int] = {}  # prefix (token ids) -> its index in the trie sequence
        tokens, parents, depths = [], [], []
        for _, ids in self.candidates:
            for j in range(1, len(ids) + 1):
                prefix = tuple(ids[:j])
                if prefix not in node_of:
                    node_of[prefix] = len(tokens)
                    tokens.append(ids[j - 1])
                    parents.append(node_of[prefix[:-1]] if j > 1 else -1)
                    depths.append(j - 1)
        n, p = len(tokens), len(prompt_ids)
        tree = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(parents):  # a parent precedes its children, so its row is already complete
            if parent >= 0:
                tree[i] |= tree[parent]
        mask = torch.cat([torch.ones(n, p, dtype=torch.bool), tree], 1)[None, None].to(dev)
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt_ids], device=dev), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), -1)
            logp = torch.log_softmax(self.model(
                torch.tensor([tokens], device=dev), attention_mask=mask, past_key_values=out.past_key_values,
                position_ids=torch.tensor([[p + d for d in depths]], device=dev), use_cache=True,
            ).logits[0].float(), -1)  # row i: the next token after the prefix that ends at node i
            seq_lp, ends = [], []
            for _, ids in self.candidates:
                lp = first[ids[0]]
                for j in range(1, len(ids)):
                    lp = lp + logp[node_of[tuple(ids[:j])], ids[j]]
                seq_lp.append(lp)
                ends.append(node_of[tuple(ids)])
            p_digit = logp[ends].exp()[:, self.digit_start].sum(-1)
            end_lp = torch.log((1.0 - p_digit).clamp_min(1e-30))
        return first, torch.stack(seq_lp).tolist(), end_lp.tolist()

    async def ask(self, prompt: str) -> dict:
        import torch

        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        first, seq_lp, end_lp = self.sequence_logprobs(prompt_ids)
        numbers, code, refusal = {}, 0.0, 0.0
        for (label, _), lp, elp in zip(self.candidates, seq_lp, end_lp):
            if label == "CODE":
                code = math.exp(lp)
            elif label == "REFUSAL":
                refusal = math.exp(lp)
            else:
                numbers[label] = math.exp(lp + elp)
        values, ids = first.topk(20)
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            token = self.tokenizer.decode([i])
            top[token] = max(top.get(token, -math.inf), v)
        await asyncio.sleep(0)  # let the progress bar and other tasks run
        return {"text": self.tokenizer.decode([int(torch.argmax(first))]), "top_logprobs": top,
                "number_probs": numbers, "code_mass": code, "refusal_mass": refusal,
                "method": "exact_multitoken"}

    async def aclose(self) -> None:
        pass


def _model_fingerprint(model_dir: str) -> str:
    """Identity of a local model for the cache: its config and the names/sizes of its files."""
    d = Path(model_dir)
    files = sorted((p.name, p.stat().st_size) for p in d.iterdir() if p.is_file())
    return stable_hash({"config": (d / "config.json").read_text(), "files": files})


def make_backend(cfg: dict, model_dir: str | None):
    if cfg["backend"] == "openai":
        return OpenAIBackend(cfg)
    if cfg["backend"] == "hf":
        return HFBackend(cfg, model_dir)
    raise UserError(f"judge {cfg['name']!r}: unknown backend {cfg['backend']!r}")


# --- cost ----------------------------------------------------------------------------------------------------------
def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters per token), for the cost estimate before spending."""
    return len(text) // 4 + 8


def call_cost(cfg: dict, prompt_tokens: float, completion_tokens: float) -> float | None:
    p_in, p_out = cfg.get("price_per_million_input_tokens"), cfg.get("price_per_million_output_tokens")
    if p_in is None or p_out is None:
        return None
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


# --- the stage -----------------------------------------------------------------------------------------------------
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
    est_cost: float | None = None
    extra: dict = field(default_factory=dict)


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

    Returns counts {total, journal, cache, asked, retries}. Raises JudgeStopped (a UserError) when the run could
    not finish (budget reached, endpoint unusable, retries exhausted): the journal and cache keep every judgment
    made, the output is not written, and a rerun asks only for the rest.
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
        ident_model = f"hf:{cfg['model']}:{_model_fingerprint(judge_model_dir)}"
    else:
        ident_model = f"{cfg['model']}@{cfg['base_url']}" if cfg.get("base_url") else cfg["model"]
    # A text-mode answer is cut at text_max_tokens: a longer limit must not reuse shorter cached answers.
    cache_mode = f"text:{cfg['text_max_tokens']}" if cfg["mode"] == "text" else cfg["mode"]
    jobs: list[_Job] = []
    for s in read_samples(samples_path):
        q = questions.get(s["question_id"])
        if q is None:
            raise UserError(f"{samples_path}: question {s['question_id']!r} is not in {questions_path}")
        answer, truncated = clean_answer(s.get("response"), cfg["max_answer_chars"])
        question = clean_answer(s.get("question"), cfg["max_answer_chars"])[0]
        full = clean_answer(s.get("response"), sys.maxsize)[0]
        for metric, template in sorted(q.judge_prompts.items()):
            jobs.append(_Job(s, metric, template, fill_prompt(template, question, answer), answer, truncated,
                             JudgeCache.key(ident_model, cache_mode, template, question, answer),
                             f"{s['response_id']}|{metric}", extra={"response": full}))

    journal = Journal(journal_path, key_field="key")
    same = {**{f: identity[f] for f in ("judge_key", "judge_model", "judge_mode", "judge_prompt_hash")},
            "min_numeric_mass": cfg["min_numeric_mass"], "max_answer_chars": cfg["max_answer_chars"]}
    done = {k: r for k, r in journal.load().items() if all(r.get(f) == v for f, v in same.items())}
    cache = JudgeCache(cache_path) if cache_path else None
    pending = [j for j in jobs if j.key not in done]
    cached = cache.get_many([j.cache_key for j in pending]) if cache else {}

    def record(job: _Job, raw: dict, source: str) -> dict:
        j = interpret(raw, cfg["mode"], cfg["min_numeric_mass"])
        row = {**{k: job.sample.get(k) for k in KEEP}, "response": job.extra["response"], **identity,
               "metric": job.metric, "score": j.score, "status": j.status, "numeric_mass": j.numeric_mass,
               "code_mass": j.code_mass, "refusal_mass": j.refusal_mass,
               "top_logprobs": raw.get("top_logprobs"), "judge_text": raw.get("text"),
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
            _announce_cost(cfg, todo)
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
    log.info("judge %s: wrote %d rows to %s (%d asked, %d retries)", judge_name, len(jobs), out_path,
             counts["asked"], counts["retries"])
    return counts


def _warn_if_digit_split(name: str, rows: list[dict]) -> None:
    """A judge whose tokenizer splits numbers into digits answers '7' for 70 too: its first-token logprobs read
    only the first digit. Warn when numbers were seen but never one with two digits."""
    numeric = [t for r in rows for t in (r.get("top_logprobs") or {}) if parse_score_token(t) is not None]
    if len(rows) >= 20 and numeric and not any(len(t.strip()) > 1 for t in numeric):
        log.warning("judge %s: its top logprobs hold only single-digit numbers: the judge model's tokenizer seems "
                    "to split numbers into digits, so the first token cannot tell 7 from 70. Use mode: text, or "
                    "the hf backend (exact multi-token expected value)", name)


def _announce_cost(cfg: dict, todo: list[_Job]) -> None:
    out_tokens = 1 if cfg["mode"] == "logprobs" else cfg["text_max_tokens"]
    in_tokens = sum(estimate_tokens(j.prompt) for j in todo)
    total = call_cost(cfg, in_tokens, out_tokens * len(todo))
    for j in todo:
        j.est_cost = call_cost(cfg, estimate_tokens(j.prompt), out_tokens)
    if total is None:
        msg = (f"judge {cfg['name']}: {len(todo)} calls, ~{in_tokens} input tokens; cost unknown (set "
               f"price_per_million_input_tokens / price_per_million_output_tokens to get an estimate)")
    else:
        budget = cfg.get("budget_usd")
        msg = (f"judge {cfg['name']}: {len(todo)} calls, ~{in_tokens} input + {out_tokens * len(todo)} output "
               f"tokens, estimated cost ${total:.4f}" + (f" (budget cap ${budget:.4f} for this judge, over all "
                                                         f"jobs sharing the cache)" if budget is not None else ""))
    log.info("%s", msg)
    print(msg, file=sys.stderr, flush=True)


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

    def add(self, rows: list[dict], cache_key: str, raw: dict, cost: float) -> None:
        self.rows.extend(rows)
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
    queue = list(reversed(todo))
    state = {"spent": writer.cache.spent(cfg["name"]) if writer.cache is not None else 0.0, "reserved": 0.0,
             "asked": 0, "stop": None}
    budget = cfg.get("budget_usd")
    bar = tqdm(total=total, initial=initial, desc=f"judge {cfg['name']}", unit="call", smoothing=0.1)

    async def worker():
        while queue and state["stop"] is None:
            job = queue.pop()
            if budget is not None and job.est_cost is not None:
                if state["spent"] + state["reserved"] + job.est_cost > budget:
                    state["stop"] = state["stop"] or JudgeStopped(
                        f"judge {cfg['name']!r}: budget cap ${budget} reached after ${state['spent']:.4f}; "
                        f"everything judged so far is kept in the journal and cache: raise "
                        f"judges.{cfg['name']}.budget_usd and rerun to judge the rest")
                    queue.append(job)
                    return
                state["reserved"] += job.est_cost
            try:
                raw = await backend.ask(job.prompt)
            except Exception as e:  # noqa: BLE001 - any failure stops the run cleanly
                state["stop"] = state["stop"] or e
                return
            finally:
                if budget is not None and job.est_cost is not None:
                    state["reserved"] -= job.est_cost
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
