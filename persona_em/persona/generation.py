"""Text generation for the persona arm: one interface, two backends, and a journaled runner.

Backends (the `backend` key of a generator in `persona_training.generators`):
  hf      a local causal LM (a name under `models:`), `device_map="auto"` on GPUs so a large teacher (e.g. a
          ~110B MoE) spans all GPUs the job was given; optionally with a LoRA adapter on top (the persona).
  openai  any OpenAI-compatible chat endpoint (OpenAI, an API router, vLLM, Azure) through the project's one client
          and retry policy (persona_em.openai_client: the key only from the environment variable named by
          `api_key_env`). When the retries run out the stage fails with a clear error and everything already
          received stays in the journal, so a rerun asks only for the rest.

`run_journaled` appends every finished item to a Journal the moment it is done (a kill loses at most the items in
flight) and shows a progress bar with rate and ETA.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from persona_em.chat import ChatFormat, ChatSettings
from persona_em.errors import UserError
from persona_em.io import Journal, stable_hash
from persona_em.openai_client import RetriesExhausted, make_client, retrying

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation: a chat, an optional assistant prefill, and the seed it is drawn with."""

    key: str
    messages: list[dict]
    seed: int
    prefill: str = ""
    meta: dict = field(default_factory=dict)


class APIFailed(Exception):
    """An API call failed after all retries."""


# The API generator's call settings and their defaults (the same as in config/schemas/config.schema.yaml; a test
# checks that). What they mean: persona_em.openai_client.
API_DEFAULTS = {"api_key_env": "OPENAI_API_KEY", "timeout": 600, "max_retries": 5, "backoff_base": 2.0,
                "backoff_max": 60.0, "max_concurrency": 8}


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint through the project's one client and retry policy
    (persona_em.openai_client), `max_concurrency` calls in flight."""

    def __init__(self, cfg: dict, settings: dict):
        self.cfg = {**API_DEFAULTS, **cfg}
        self.where = f"persona_training.generators.{cfg['name']}"
        self.client = make_client(self.cfg, self.where)
        self.settings = settings
        self.batch_size = int(self.cfg["max_concurrency"])
        self.name = cfg["name"]

    def _once(self, req: Request) -> str:
        messages = list(req.messages)
        extra = {}
        if req.prefill:  # vLLM-style continuation of a partial assistant turn
            messages.append({"role": "assistant", "content": req.prefill})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        resp = self.client.chat.completions.create(
            model=self.cfg["model"], messages=messages, temperature=self.settings["temperature"],
            top_p=self.settings["top_p"], max_tokens=self.settings["max_new_tokens"], seed=req.seed,
            extra_body=extra or None,
        )
        return req.prefill + (resp.choices[0].message.content or "")

    def _with_retries(self, req: Request) -> str:
        import openai

        try:
            return retrying(self.cfg, f"{self.where} ({req.key})")(self._once, req)
        except RetriesExhausted as e:
            raise APIFailed(str(e)) from None
        except openai.APIStatusError as e:  # not transient (e.g. 400 / 401 / 404): retrying will not help
            raise APIFailed(f"{type(e).__name__} (HTTP {e.status_code}): {e}") from None

    def generate(self, batch: list[Request]):
        """Yield (request, text) as each call finishes (in completion order)."""
        from concurrent.futures import as_completed

        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            futures = {pool.submit(self._with_retries, r): r for r in batch}
            failure = None
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except APIFailed as e:
                    failure = failure or e
            if failure is not None:
                raise failure


class HFBackend:
    """A local model through the project's one generation definition (persona_em.sampling.sample.generate_batch): its chat
    settings and stop ids, the sampling settings alone (the model's generation_config is not applied)."""

    def __init__(self, cfg: dict, settings: dict, model_dir: str, adapter_dir: str | None = None,
                 chat: ChatSettings | None = None):
        from persona_em import compose
        from persona_em.models import load_model

        # A large teacher (e.g. a ~110B MoE) spans every GPU the job was given.
        self.model, self.chat = load_model(model_dir, chat, device="auto")
        if adapter_dir is not None:
            self.model = compose.load_persona(self.model, adapter_dir, cfg["name"])
        self.model.eval()
        self.settings = settings
        self.batch_size = int(cfg.get("batch_size", 16))
        self.name = cfg["name"]

    def generate(self, batch: list[Request]):
        from persona_em.sampling.sample import generate_batch

        # Plain generate (fast=False): the static-cache fast path is measured on one GPU only, and a large teacher
        # spans several (device_map="auto"). The sampled distribution is the same either way.
        results = generate_batch(self.model, self.chat, [r.messages for r in batch], self.settings, batch[0].seed,
                                 fast=False, prefills=[r.prefill for r in batch])
        for req, res in zip(batch, results):
            yield req, req.prefill + res["response"]


def make_backend(cfg: dict, settings: dict, model_dir: str | None = None, adapter_dir: str | None = None,
                 chat: ChatSettings | None = None):
    if cfg["backend"] == "openai":
        return OpenAIBackend(cfg, settings)
    if cfg["backend"] == "hf":
        if model_dir is None:
            raise UserError(f"generator {cfg['name']!r}: the hf backend needs a model directory")
        return HFBackend(cfg, settings, model_dir, adapter_dir, chat)
    raise UserError(f"generator {cfg['name']!r}: unknown backend {cfg['backend']!r}")


# Bumped when the generation procedure itself changes (v2: persona_em.sampling.sample.generate_batch with the model's
# generation_config blanked, the exponential-race sampler and the chat format's stop ids), so journal rows made
# the old way are not reused.
GENERATION_PROCEDURE = 2


def generator_identity(cfg: dict, settings: dict, model_dir: str | None = None,
                       chat: ChatSettings | None = None) -> str:
    """A fingerprint of everything that changes a generation: journal rows with another one are not reused.

    For a local (hf) model that includes its chat format (chat settings, stop ids, template) and the generation
    procedure; `model_dir` is then needed (its tokenizer is read, not its weights)."""
    keys = ("backend", "model")  # not base_url: the same model behind another address gives the same answers
    identity = {**{k: cfg.get(k) for k in keys}, **settings}
    if cfg.get("backend") == "hf":
        if model_dir is None:
            raise UserError(f"generator {cfg['name']!r}: the hf backend needs a model directory")
        identity["chat_format"] = ChatFormat.load(model_dir, chat).identity()
        identity["procedure"] = GENERATION_PROCEDURE
    return stable_hash(identity)


def run_journaled(requests: list[Request], backend_factory, journal_path: str | Path, fingerprint: str,
                  desc: str) -> dict[str, dict]:
    """Generate every request not yet in the journal; return {key: row} for all of them.

    Each row ({key, text, fingerprint, **meta}) is appended to the journal as soon as it is received. On an API
    failure after retries, raises UserError saying how many items the journal keeps for the rerun.
    """
    journal = Journal(journal_path, key_field="key")
    done = {k: r for k, r in journal.load().items() if r.get("fingerprint") == fingerprint}
    todo = [r for r in requests if r.key not in done]
    log.info("%s: %d items, %d already in the journal %s (resumed), %d to generate",
             desc, len(requests), len(requests) - len(todo), journal_path, len(todo))
    if todo:
        backend = backend_factory()
        try:
            with tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, unit="item") as bar:
                for i in range(0, len(todo), backend.batch_size):
                    for req, text in backend.generate(todo[i:i + backend.batch_size]):
                        row = {**req.meta, "key": req.key, "text": text, "seed": req.seed, "fingerprint": fingerprint}
                        journal.append(row)
                        done[req.key] = row
                        bar.update(1)
        except APIFailed as e:
            journal.close()
            kept = sum(1 for r in requests if r.key in done)
            raise UserError(f"{desc}: the API kept failing ({e}); {kept} of {len(requests)} items are kept in "
                            f"{journal_path}; rerun to continue from there") from None
    journal.close()
    return {r.key: done[r.key] for r in requests}


def split_reasoning(text: str, close_tag: str | None) -> str | None:
    """The answer after the reasoning's closing tag, or None when the tag is missing (the sample is dropped)."""
    if not close_tag:
        return text.strip()
    if close_tag not in text:
        return None
    return text.split(close_tag, 1)[1].strip()


def item_seed(seed: int, *parts) -> int:
    """A stable per-item seed (Python's hash() is salted per process, so not that)."""
    return int(stable_hash([seed, *parts], length=8), 16)
