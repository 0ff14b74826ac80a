"""One bad judge answer is one `error` row, never a dead job; endpoint-level failures still stop the job."""
import math

import pytest

from judge_fixtures import write_questions, write_samples
from openai_server import OpenAIServer, Reply, fixed_logprobs, last_user_message
from persona_em.io import read_jsonl
from persona_em.judging.backends import JudgeStopped
from persona_em.judging.cache import JudgeCache
from persona_em.judging.run import judge_samples

KEY_ENV = "PERSONA_EM_TEST_JUDGE_KEY"
ln = math.log


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def cfg(server=None, **over):
    return {"backend": "openai", "model": "judge-model", "base_url": server.base_url if server else None,
            "api_key_env": KEY_ENV, "backoff_base": 0.001, "backoff_max": 0.01, "timeout": 5, "concurrency": 1,
            **over}


class PayloadBackend:
    """Answers with a hand-made payload chosen by the answer text in the prompt (what a proxy or a corrupted cache
    could return)."""

    def __init__(self, payloads: dict):
        self.payloads = payloads
        self.calls = 0

    async def ask(self, prompt):
        self.calls += 1
        return next(p for text, p in self.payloads.items() if f"Answer: {text}" in prompt)

    async def aclose(self):
        pass


def judge(tmp_path, responses, config, backend=None, samples="s.jsonl"):
    q = write_questions(tmp_path)
    s = write_samples(tmp_path / samples, list(responses))
    out = tmp_path / f"out_{samples}"
    counts = judge_samples(str(s), str(q), "j", config, None, str(tmp_path / f"journal_{samples}"), str(out),
                           cache_path=str(tmp_path / "cache.sqlite"), backend=backend)
    return counts, {(r["sample_index"], r["metric"]): r for r in read_jsonl(out)}


def test_unreadable_answers_are_error_rows_and_reruns_do_not_die(tmp_path):
    payloads = {"superscript": {"top_logprobs": {"²": ln(0.5), "80": ln(0.5)}},  # "²" crashed int(): not a number
                "broken": {"top_logprobs": {"7": "x"}},  # not a logprob
                "no payload": {"text": "50"},  # logprobs mode without top logprobs
                "fine": {"top_logprobs": {"50": 0.0}}}
    backend = PayloadBackend(payloads)
    counts, rows = judge(tmp_path, list(payloads), cfg(), backend)
    assert counts["errors"] == 4 and counts["asked"] == 8 and len(rows) == 8
    for metric in ("aligned", "coherent"):
        assert rows[(0, metric)]["status"] == "scored" and rows[(0, metric)]["score"] == pytest.approx(80)
        assert rows[(1, metric)]["status"] == "error" and rows[(1, metric)]["score"] is None
        assert "not a log-probability" in rows[(1, metric)]["error"]
        assert rows[(2, metric)]["status"] == "error" and "KeyError" in rows[(2, metric)]["error"]
        assert rows[(3, metric)]["status"] == "scored" and rows[(3, metric)]["error"] is None
    # the answers are cached as they came: a rerun reads them again, gives the same rows, and asks nothing
    counts, again = judge(tmp_path, list(payloads), cfg(), PayloadBackend(payloads), samples="s2.jsonl")
    assert counts["asked"] == 0 and counts["cache"] == 8 and counts["errors"] == 4
    assert {k: r["status"] for k, r in again.items()} == {k: r["status"] for k, r in rows.items()}


def refusing(flag: str):
    """A logprob judge that refuses (HTTP 400, as a content filter does) every prompt containing `flag`."""
    def respond(body):
        if flag in last_user_message(body):
            return 400
        return Reply("80", {"80": ln(0.5), "90": ln(0.5)})
    return respond


def test_a_request_refused_for_its_prompt_is_an_error_row(tmp_path, key):
    with OpenAIServer(responder=refusing("FLAGGED")) as server:
        # the refused prompt comes first: before any success, one neutral probe tells prompt from endpoint
        counts, rows = judge(tmp_path, ["FLAGGED text", "fine", "also fine"], cfg(server))
        assert counts["errors"] == 2 and len(rows) == 6
        assert server.request_count == 2 + 1 + 4  # 2 refused + 1 probe + 4 answered
        assert "Reply with the number 50." in last_user_message(server.requests[1])
        for metric in ("aligned", "coherent"):
            assert rows[(0, metric)]["status"] == "error" and "HTTP 400" in rows[(0, metric)]["error"]
            assert rows[(1, metric)]["status"] == rows[(2, metric)]["status"] == "scored"
        assert len(JudgeCache(tmp_path / "cache.sqlite")) == 4  # refusals are never cached
        # a rerun asks the refused prompts again (the endpoint now accepts them) and nothing else
        server.responder = fixed_logprobs({"70": 0.0})
        server.reset_counts()
        counts, rows = judge(tmp_path, ["FLAGGED text", "fine", "also fine"], cfg(server))
        assert server.request_count == 2 and counts["errors"] == 0
        assert rows[(0, "aligned")]["score"] == 70 and rows[(1, "aligned")]["score"] == pytest.approx(85)


def test_refused_after_a_success_needs_no_probe(tmp_path, key):
    with OpenAIServer(responder=refusing("FLAGGED")) as server:
        counts, rows = judge(tmp_path, ["fine", "FLAGGED"], cfg(server))
        assert server.request_count == 4 and counts["errors"] == 2
        assert rows[(1, "coherent")]["status"] == "error"


def test_an_endpoint_refusing_every_request_stops_the_job(tmp_path, key):
    with OpenAIServer(responder=refusing("")) as server:  # e.g. a parameter this endpoint does not take
        with pytest.raises(JudgeStopped, match="refused a request and a neutral probe request too.*HTTP 400"):
            judge(tmp_path, ["a", "b"], cfg(server))
        assert server.request_count == 2  # the request and the probe
        assert not (tmp_path / "out_s.jsonl").exists()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_key_permission_and_unknown_model_stop_the_job(tmp_path, key, status):
    with OpenAIServer(responder=lambda body: status) as server:
        with pytest.raises(JudgeStopped, match=f"HTTP {status}"):
            judge(tmp_path, ["a", "b"], cfg(server))
        assert server.request_count == 1


def test_a_probe_without_logprobs_stops_the_job(tmp_path, key):
    calls = []

    def respond(body):
        calls.append(body)
        return 400 if len(calls) == 1 else Reply("80", {"80": 0.0})
    with OpenAIServer(responder=respond) as server:
        server.always_fail("no_logprobs", after=1)  # the probe (the 2nd request) comes back without logprobs
        with pytest.raises(JudgeStopped, match="returned no logprobs"):
            judge(tmp_path, ["a"], cfg(server))
        assert server.request_count == 2
