"""The one OpenAI-compatible client and the one retry policy, used by the judge and by the persona generator.

`make_client(cfg, where)` builds the client from a settings dict: `base_url` (OpenAI when unset, an API router, a
vLLM server), `azure_api_version` (set for Azure OpenAI: `base_url` is then the Azure endpoint), `api_key_env` (the
name of the variable holding the key: the key is read from the environment only and never logged or written),
`timeout` (seconds per request). `retrying(cfg, where)` is the retry policy for one call: up to `max_retries`
retries of a transient failure (HTTP 408 / 409 / 429 / 5xx, a timeout, a lost connection, a malformed body), each
after the server's Retry-After (retry-after-ms or retry-after, at most RETRY_AFTER_CAP) or else after an exponential
back-off with jitter (`backoff_base` seconds doubling, at most `backoff_max`). When the retries run out it raises
RetriesExhausted; any other failure (e.g. 400 / 401 / 404) is raised at once, for the caller to classify.

Why tenacity and not the client's own `max_retries`: the client retries 408/409/429/5xx/timeouts and honours
Retry-After, but it does not retry a malformed 200 body (an API router sometimes sends one), its back-off constants
are fixed (0.5 s doubling to 8 s), it gives up at once on a Retry-After over 120 s, and it neither logs a retry as a
warning nor lets the judge count them (the judge reports its retries per job). So the client is built with
`max_retries=0` and tenacity (pinned in pyproject.toml) runs the one policy, for the sync and the async client alike.
"""
from __future__ import annotations

import json
import logging
import os

from persona_em.errors import UserError

log = logging.getLogger(__name__)

RETRY_AFTER_CAP = 600.0  # never sleep longer than this on a server's say-so


class RetriesExhausted(Exception):
    """A transient failure persisted through every retry."""


def make_client(cfg: dict, where: str, *, asynchronous: bool = False):
    """An OpenAI-compatible client for the settings `cfg` at config key `where` (e.g. "judges.gpt"); the client
    itself never retries (see `retrying`)."""
    import openai

    env = cfg["api_key_env"]
    key = os.environ.get(env)
    if not key:
        raise UserError(f"config {where}.api_key_env: the API key variable {env} is not set in the environment")
    common = {"api_key": key, "timeout": cfg["timeout"], "max_retries": 0}
    if cfg.get("azure_api_version"):
        azure = openai.AsyncAzureOpenAI if asynchronous else openai.AzureOpenAI
        return azure(azure_endpoint=cfg["base_url"], api_version=cfg["azure_api_version"], **common)
    return (openai.AsyncOpenAI if asynchronous else openai.OpenAI)(base_url=cfg.get("base_url"), **common)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the status codes the openai client itself retries, timeouts, lost connections, bad bodies."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError))


def retry_after(exc: BaseException) -> float | None:
    """The server's requested wait in seconds (retry-after-ms, else retry-after), capped; None when not sent."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            value = float(response.headers.get(header)) / scale
        except (TypeError, ValueError):
            continue
        if value >= 0:
            return min(value, RETRY_AFTER_CAP)
    return None


def retrying(cfg: dict, where: str, *, asynchronous: bool = False, on_retry=None):
    """The retry policy for ONE call (a fresh object each call: tenacity keeps per-call state in it), used as
    `retrying(cfg, where)(fn, *args)` or `await retrying(cfg, where, asynchronous=True)(coro_fn, *args)`, where
    coro_fn is an `async def` (the async client's methods are plain functions returning a coroutine: wrap them).
    `on_retry()` is called before each retry's wait."""
    import tenacity  # here, like openai: the analysis stack imports persona_em.judging.identity without either

    attempts = cfg["max_retries"] + 1
    backoff = tenacity.wait_exponential_jitter(multiplier=cfg["backoff_base"], max=cfg["backoff_max"],
                                               jitter=cfg["backoff_base"])

    def wait(state):
        after = retry_after(state.outcome.exception())
        return backoff(state) if after is None else after

    def before_sleep(state):
        error = state.outcome.exception()
        log.warning("%s: %s, retry %d/%d in %.2f s", where, type(error).__name__, state.attempt_number,
                    attempts - 1, state.next_action.sleep)
        if on_retry is not None:
            on_retry()

    def give_up(state):
        error = state.outcome.exception()
        raise RetriesExhausted(f"gave up after {attempts} attempts; last error: {type(error).__name__}: "
                               f"{str(error)[:200]}") from None

    return (tenacity.AsyncRetrying if asynchronous else tenacity.Retrying)(
        stop=tenacity.stop_after_attempt(attempts), wait=wait, retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep, retry_error_callback=give_up)
