"""The one OpenAI-compatible client and retry policy (persona_em.openai_client), sync and async, over real HTTP
against tests/openai_server.py; and the API generator on it (the judge's cases: tests/test_judge_openai.py)."""
import asyncio
import time
from pathlib import Path

import pytest
import yaml

from openai_server import OpenAIServer, scripted
from persona_em.errors import UserError
from persona_em.openai_client import RetriesExhausted, make_client, retrying
from persona_em.persona.generation import API_DEFAULTS, APIFailed, OpenAIBackend, Request

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "PERSONA_EM_TEST_CLIENT_KEY"
SETTINGS = {"api_key_env": KEY_ENV, "timeout": 0.5, "max_retries": 2, "backoff_base": 0.001, "backoff_max": 0.01}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def call(server, asynchronous, counter=None, **over):
    """One chat completion through make_client + retrying; returns the answer text."""
    cfg = {**SETTINGS, "base_url": server.base_url, **over}
    if cfg.get("azure_api_version"):
        cfg["base_url"] = server.endpoint
    on_retry = (lambda: counter.append(1)) if counter is not None else None
    client = make_client(cfg, "test.api", asynchronous=asynchronous)
    if not asynchronous:
        return retrying(cfg, "test.api", on_retry=on_retry)(client.chat.completions.create, **BODY) \
            .choices[0].message.content

    async def run():
        try:
            async def create():
                return await client.chat.completions.create(**BODY)

            resp = await retrying(cfg, "test.api", asynchronous=True, on_retry=on_retry)(create)
            return resp.choices[0].message.content
        finally:
            await client.close()
    return asyncio.run(run())


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("fault", ["429", "500", "timeout", "malformed"])
def test_transient_faults_are_retried_and_counted(asynchronous, fault):
    with OpenAIServer(responder=scripted(lambda body, i: "fine"), timeout_sleep=1.5) as server:
        server.fail_next(fault, times=2)
        retries = []
        assert call(server, asynchronous, retries) == "fine"
        assert server.fault_counts[fault] == 2 and server.request_count == 3 and len(retries) == 2


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_retry_after_is_honoured(asynchronous):
    with OpenAIServer(responder=scripted(lambda body, i: "fine"), retry_after=0.6) as server:
        server.fail_next("429")
        t0 = time.monotonic()
        call(server, asynchronous)  # backoff is 1 ms: only Retry-After makes it wait
        assert time.monotonic() - t0 >= 0.6 and server.request_count == 2


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_giving_up_and_not_retrying(asynchronous):
    import openai

    with OpenAIServer(responder=scripted(lambda body, i: 500)) as server:
        with pytest.raises(RetriesExhausted, match="gave up after 3 attempts; last error: InternalServerError"):
            call(server, asynchronous)
        assert server.request_count == 3
    with OpenAIServer(responder=scripted(lambda body, i: 404)) as server:
        with pytest.raises(openai.NotFoundError):
            call(server, asynchronous)
        assert server.request_count == 1  # not transient: raised at once for the caller to classify


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_azure_and_missing_key(asynchronous, monkeypatch):
    with OpenAIServer(responder=scripted(lambda body, i: "from azure")) as server:
        assert call(server, asynchronous, azure_api_version="2024-10-21") == "from azure"
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(UserError, match=f"config test.api.api_key_env: the API key variable {KEY_ENV} is not"):
            call(server, asynchronous)
        assert server.request_count == 1


def test_api_generator_retries_what_the_judge_retries():
    """The generator's own loop neither retried a malformed body nor honoured Retry-After: one policy now."""
    with OpenAIServer(responder=scripted(lambda body, i: "hello"), timeout_sleep=1.5) as server:
        for fault in ("malformed", "429", "500", "timeout"):
            server.fail_next(fault)
        gen = OpenAIBackend({"name": "api", "backend": "openai", "model": "m", "base_url": server.base_url,
                             **SETTINGS, "max_retries": 4, "max_concurrency": 1},
                            {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8})
        [(req, text)] = list(gen.generate([Request("k", [{"role": "user", "content": "hi"}], seed=1)]))
        assert text == "hello" and server.request_count == 5
    with OpenAIServer(responder=scripted(lambda body, i: 401)) as server:
        gen.client = make_client({**gen.cfg, "base_url": server.base_url}, gen.where)
        with pytest.raises(APIFailed, match="HTTP 401"):
            list(gen.generate([Request("k", [{"role": "user", "content": "hi"}], seed=1)]))
        assert server.request_count == 1


def test_generator_api_defaults_match_the_schema():
    schema = yaml.safe_load((ROOT / "config/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["persona_training"]["properties"]["generators"]["additionalProperties"]["properties"]
    for key, value in API_DEFAULTS.items():
        assert props[key]["default"] == value, key
    assert "backoff_seconds" not in props  # replaced by backoff_base / backoff_max, as the judge's
