"""The judge backends: any OpenAI-compatible endpoint, or a local causal LM with the exact multi-token expected value
(the method: persona_em/judging/__init__.py)."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

from persona_em.errors import UserError
from persona_em.io import stable_hash
from persona_em.openai_client import RetriesExhausted, make_client, retrying
from persona_em.judging.scoring import starts_a_number


class JudgeStopped(UserError):
    """The run stopped before every judgment was made (budget, repeated API errors, unusable endpoint)."""


class JudgeRequestError(Exception):
    """The endpoint refused one request for what it holds (e.g. a content filter), not for how it is asked: that
    prompt's judgment is an `error` row and the run goes on."""


PER_REQUEST_STATUS = (400, 413, 422)  # bad request, too large, unprocessable: about this prompt, unless the probe fails
PROBE_PROMPT = "Reply with the number 50."  # a neutral request: does the endpoint accept this judge's requests at all?


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint: OpenAI, OpenRouter, a vLLM server (base_url), or Azure OpenAI
    (azure_api_version set; base_url is then the Azure endpoint and model the deployment name). The client and its
    retry policy: persona_em.openai_client."""

    def __init__(self, cfg: dict):
        self.where = f"judges.{cfg['name']}"
        self.client = make_client(cfg, self.where, asynchronous=True)
        self.cfg = cfg
        self.retries = 0
        self.identity_model = cfg["model"]
        self.works = False  # set once the endpoint answered a request of this run
        self._probe_lock = asyncio.Lock()

    def request(self, prompt: str, max_tokens: int | None = None) -> dict:
        """The request body: the judge's mode, or a text answer of at most `max_tokens` tokens when given."""
        kw = {"model": self.cfg["model"], "messages": [{"role": "user", "content": prompt}], "temperature": 0,
              "seed": 0}
        if max_tokens is None and self.cfg["mode"] == "logprobs":
            return {**kw, "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
        return {**kw, "max_tokens": max_tokens or self.cfg["text_max_tokens"]}

    async def ask(self, prompt: str) -> dict:
        return self._raw(await self._with_retries(prompt, None), None)

    async def ask_text(self, prompt: str, max_tokens: int) -> dict:
        """A greedy text answer of at most max_tokens tokens, whatever the judge's mode (label questions)."""
        return self._raw(await self._with_retries(prompt, max_tokens), max_tokens)

    def _raw(self, resp, max_tokens: int | None) -> dict:
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        raw = {"text": choice.message.content or "",
               "prompt_tokens": getattr(usage, "prompt_tokens", None),
               "completion_tokens": getattr(usage, "completion_tokens", None)}
        if max_tokens is None and self.cfg["mode"] == "logprobs":
            content = choice.logprobs.content if choice.logprobs else None
            if not content or not content[0].top_logprobs:
                raise JudgeStopped(
                    f"judge {self.cfg['name']!r}: the endpoint {self.cfg.get('base_url') or 'api.openai.com'} "
                    f"returned no logprobs for model {self.cfg['model']!r} in mode 'logprobs'; use an endpoint that "
                    f"supports logprobs/top_logprobs, or set judges.{self.cfg['name']}.mode: text")
            raw["top_logprobs"] = {t.token: t.logprob for t in content[0].top_logprobs}
        return raw

    async def probe(self, max_tokens: int | None) -> None:
        """After a per-request refusal before any request of this run succeeded: one neutral request of the same
        kind (retried like any). If the endpoint refuses that too, the refusal is about the endpoint and the run
        stops (JudgeStopped); otherwise it was about the prompt."""
        async with self._probe_lock:
            if not self.works:
                self._raw(await self._with_retries(PROBE_PROMPT, max_tokens, probing=True), max_tokens)

    async def _with_retries(self, prompt: str, max_tokens: int | None, probing: bool = False):
        import openai

        def counted():
            self.retries += 1

        async def create():
            return await self.client.chat.completions.create(**self.request(prompt, max_tokens))

        try:
            resp = await retrying(self.cfg, self.where, asynchronous=True, on_retry=counted)(create)
        except RetriesExhausted as e:
            raise JudgeStopped(f"judge {self.cfg['name']!r}: {e}") from None
        except openai.APIStatusError as e:  # not transient (openai_client.is_transient): about the request
            if e.status_code in PER_REQUEST_STATUS:
                if probing:
                    raise JudgeStopped(
                        f"judge {self.cfg['name']!r}: the endpoint refused a request and a neutral probe request "
                        f"too (HTTP {e.status_code}: {e.message}): it refuses this judge's requests, not one "
                        f"prompt; check base_url, model, mode and the key in {self.cfg['api_key_env']}") from None
                await self.probe(max_tokens)
                raise JudgeRequestError(f"HTTP {e.status_code}: {e.message}") from None
            raise JudgeStopped(f"judge {self.cfg['name']!r}: the endpoint refused the request "
                               f"(HTTP {e.status_code}: {e.message}); check base_url, model and "
                               f"the key in {self.cfg['api_key_env']}") from None
        self.works = True
        return resp

    async def aclose(self) -> None:
        await self.client.close()


class HFBackend:
    """A local causal LM as judge, with the exact multi-token expected value (the method: this package's docstring)."""

    def __init__(self, cfg: dict, model_dir: str):
        import torch

        from persona_em import models
        from persona_em.chat import ChatSettings

        if cfg["mode"] != "logprobs":
            raise UserError(f"judge {cfg['name']!r}: the hf backend supports mode 'logprobs' only")
        # The judge model's chat settings (cfg["chat"], from its model manifest): thinking off by default, or a
        # Qwen3 judge would put its first-token mass on <think>.
        self.model, self.chat = models.load_model(model_dir, ChatSettings.from_dict(cfg.get("chat"), cfg["model"]))
        self.tokenizer = self.chat.tokenizer
        self.model.eval()
        self.identity_model = f"hf:{cfg['model']}:{model_fingerprint(model_dir)}"
        tok = self.tokenizer
        # The logits can be wider than the tokenizer (real Qwen2.5: 152,064 rows for 151,665 tokens; the extra rows
        # are padding no text decodes to): the mask covers every logit, padding rows are never digits.
        self.n_tokens = len(tok)
        width = self.model.get_output_embeddings().weight.shape[0]
        starts = [starts_a_number(tok.decode([i])) for i in range(min(self.n_tokens, width))]
        self.digit_start = torch.tensor(starts + [False] * (width - len(starts)), device=self.model.device)
        self.candidates: list[tuple[str, list[int]]] = []  # (label, canonical token ids)
        for label in [str(k) for k in range(101)] + ["CODE", "REFUSAL"]:
            ids = tok.encode(label, add_special_tokens=False)
            if tok.decode(ids) != label:
                raise UserError(f"judge {cfg['name']!r}: tokenizer does not round-trip {label!r}")
            self.candidates.append((label, ids))

    def sequence_logprobs(self, prompt_ids: list[int]):
        """log P(candidate) for every candidate, and log P(no further digit | prompt, candidate) (tensors)."""
        import torch

        dev = self.model.device
        ids = [c for _, c in self.candidates]
        width = max(len(c) for c in ids)
        pad = self.tokenizer.pad_token_id
        batch = torch.tensor([c + [pad] * (width - len(c)) for c in ids], device=dev)
        lengths = torch.tensor([len(c) for c in ids], device=dev)
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt_ids], device=dev), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), -1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(ids))
            # Right padding under a causal mask: real positions never see the pads, so no attention mask is needed.
            logp = torch.log_softmax(self.model(batch, past_key_values=cache, use_cache=True).logits.float(), -1)
            # token j (j >= 1) of a candidate is predicted at position j - 1 of the continuation
            nxt = logp[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]
            real = torch.arange(1, width, device=dev)[None, :] < lengths[:, None]
            seq_lp = first[batch[:, 0]] + (nxt * real).sum(-1)
            last = logp[torch.arange(len(ids), device=dev), lengths - 1]
            p_digit = last.exp()[:, self.digit_start].sum(-1)
            end_lp = torch.log((1.0 - p_digit).clamp_min(1e-30))
        return first, seq_lp.tolist(), end_lp.tolist()

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.chat.prompt_ids([{"role": "user", "content": prompt}])

    async def ask(self, prompt: str) -> dict:
        answer = self._answer(*self.sequence_logprobs(self._prompt_ids(prompt)))
        await asyncio.sleep(0)  # let the progress bar and other tasks run
        return answer

    # Prompts per ask_many call from the judge stage: one call is a few forward passes (hf_batch.py).
    max_prompts_per_call = 64

    async def ask_many(self, prompts: list[str]) -> list[dict]:
        """`ask` for many prompts, batched: several prompts per forward pass, all candidate answers of a prompt in
        the same pass (hf_batch.py); the same values as `ask`, up to floating-point rounding."""
        from persona_em.judging import hf_batch

        if not hf_batch.supports(self.model):
            return [await self.ask(p) for p in prompts]

        def run():
            ids = [self._prompt_ids(p) for p in prompts]
            scored = hf_batch.score_prompts(self.model, ids, [c for _, c in self.candidates], self.digit_start,
                                            self.tokenizer.pad_token_id)
            return [self._answer(*s) for s in scored]

        return await asyncio.to_thread(run)  # the event loop keeps writing journal rows meanwhile

    def _answer(self, first, seq_lp: list[float], end_lp: list[float]) -> dict:
        """The raw (cached) answer from the first-token log-probabilities and the candidates' log-probabilities."""
        import torch

        numbers, code, refusal = {}, 0.0, 0.0
        for (label, _), lp, elp in zip(self.candidates, seq_lp, end_lp):
            if label == "CODE":
                code = math.exp(lp)
            elif label == "REFUSAL":
                refusal = math.exp(lp)
            else:
                numbers[label] = math.exp(lp + elp)
        values, ids = first[:self.n_tokens].topk(min(20, self.n_tokens))  # padding rows are not tokens
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            token = self.tokenizer.decode([i])
            top[token] = max(top.get(token, -math.inf), v)
        return {"text": self.tokenizer.decode([int(torch.argmax(first))]), "top_logprobs": top,
                "number_probs": numbers, "code_mass": code, "refusal_mass": refusal,
                "method": "exact_multitoken"}

    async def ask_text(self, prompt: str, max_tokens: int) -> dict:
        """A greedy text answer of at most max_tokens tokens (label questions), generated as every response is."""
        from persona_em.sampling.sample import generate_batch

        out = generate_batch(self.model, self.chat, [[{"role": "user", "content": prompt}]],
                             {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_tokens}, seed=0, fast=False)
        await asyncio.sleep(0)
        return {"text": out[0]["response"], "method": "greedy_text"}

    async def aclose(self) -> None:
        pass


def model_fingerprint(model_dir: str) -> str:
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
