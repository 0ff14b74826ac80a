"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (no network, no patching).

Serves POST /v1/chat/completions (also under /openai/deployments/<name>/chat/completions, the Azure layout).
What it answers is decided by a `responder(request_body) -> Reply`; faults are injected per request.

    with OpenAIServer(responder=fixed_logprobs({"80": -0.1, "90": -2.4}), latency=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        server.fail_next("429", times=2, retry_after=0.05)   # the next 2 requests get 429 with Retry-After
        assert server.request_count == 3

Faults (`fail_next(kind, times)` queues them; `always_fail(kind, after=n)` for every request after n more):
  "429"          status 429 with a `Retry-After` header (seconds, `retry_after`)
  "500"          status 500 with an error body
  "timeout"      sleeps `timeout_sleep` seconds before answering (longer than the client's timeout)
  "malformed"    status 200 with a body that is not JSON
  "no_logprobs"  a normal completion without the `logprobs` field (what an endpoint without logprob support does)

Every request is counted (`request_count`, per fault in `fault_counts`) and its JSON body kept in `requests`
(headers are not kept, so an API key never lands in a test log); `max_in_flight` is the peak concurrency seen.
"""
from __future__ import annotations

import collections
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("429", "500", "timeout", "malformed", "no_logprobs")


@dataclass
class Reply:
    """What the model 'answers': the content text and, for logprob requests, the first token's top logprobs."""
    content: str
    top_logprobs: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 100
    completion_tokens: int = 1


def fixed_logprobs(top: dict[str, float]) -> Callable[[dict], Reply]:
    """Always the same top logprobs; the content is the most likely token."""
    best = max(top, key=top.get)
    return lambda body: Reply(best, dict(top))


def fixed_text(content: str) -> Callable[[dict], Reply]:
    return lambda body: Reply(content, {content: 0.0})


def scripted(reply: Callable[[dict, int], "str | int"]) -> Callable[[dict], "Reply | int"]:
    """A responder from `reply(body, call_index)`: a string answers with that text, an int fails the call with
    that HTTP status (for generator tests: scripted answers and failures by call number)."""
    calls = iter(range(1 << 62))

    def responder(body: dict):
        result = reply(body, next(calls))
        return result if isinstance(result, int) else Reply(result, {result: 0.0})

    return responder


def last_user_message(body: dict) -> str:
    user = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = user[-1]["content"] if user else ""
    return content if isinstance(content, str) else json.dumps(content)


def hashed_scores(body: dict) -> Reply:
    """A deterministic, prompt-dependent answer: a peaked distribution around a score derived from the prompt."""
    import hashlib

    h = int(hashlib.sha256(last_user_message(body).encode("utf-8", "replace")).hexdigest(), 16)
    centre = h % 101
    top = {str(k): -abs(k - centre) / 3 for k in range(max(0, centre - 9), min(100, centre + 10) + 1)}
    norm = math.log(sum(math.exp(v) for v in top.values()))
    return Reply(str(centre), {t: v - norm for t, v in top.items()})


class OpenAIServer:
    """A real HTTP server in a background thread. Use as a context manager, or call start()/stop()."""

    def __init__(self, responder: Callable[[dict], Reply] = hashed_scores, latency: float = 0.0,
                 retry_after: float = 0.05, timeout_sleep: float = 2.0):
        self.responder = responder
        self.latency = latency
        self.retry_after = retry_after
        self.timeout_sleep = timeout_sleep
        self.requests: list[dict] = []
        self.fault_counts: collections.Counter = collections.Counter()
        self._faults: collections.deque = collections.deque()
        self._always: str | None = None
        self._always_from = 0
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests the server was handling at once
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def endpoint(self) -> str:
        """The server root (Azure-style clients take this as azure_endpoint)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def fail_next(self, kind: str, times: int = 1) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {FAULTS}")
        with self._lock:
            self._faults.extend([kind] * times)

    def always_fail(self, kind: str | None, after: int = 0) -> None:
        """Every request from now on (or once `after` more requests were served normally) gets `kind`;
        None switches it off."""
        if kind is not None and kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {FAULTS}")
        with self._lock:
            self._always = kind
            self._always_from = len(self.requests) + after

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.fault_counts.clear()
            self.max_in_flight = 0

    def start(self) -> "OpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: tests read counters, not access logs
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 256
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- serving -----------------------------------------------------------------------------------------------
    def _send(self, handler, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired)

    def _handle(self, handler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._serve(handler)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve(self, handler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        raw = handler.rfile.read(length)
        if not handler.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
            return self._send(handler, 404, b'{"error": {"message": "not found"}}')
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._send(handler, 400, b'{"error": {"message": "invalid JSON"}}')
        with self._lock:
            self.requests.append(body)
            always = self._always if len(self.requests) > self._always_from else None
            fault = self._faults.popleft() if self._faults else always
            if fault:
                self.fault_counts[fault] += 1
        if self.latency:
            time.sleep(self.latency)
        if fault == "429":
            return self._send(handler, 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                              {"Retry-After": f"{self.retry_after:g}"})
        if fault == "500":
            return self._send(handler, 500, b'{"error": {"message": "internal error", "type": "server_error"}}')
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        if fault == "malformed":
            return self._send(handler, 200, b'{"id": "chatcmpl-x", "choices": [{"mess')
        reply = self.responder(body)
        if isinstance(reply, int):  # a scripted failure status
            return self._send(handler, reply, b'{"error": {"message": "scripted failure", "type": "server_error"}}')
        want_logprobs = bool(body.get("logprobs")) and fault != "no_logprobs"
        self._send(handler, 200, json.dumps(self._completion(body, reply, want_logprobs)).encode())

    @staticmethod
    def _completion(body: dict, reply: Reply, want_logprobs: bool) -> dict:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        n_top = int(body.get("top_logprobs") or 0)
        choice = {"index": 0, "finish_reason": "length" if max_tokens == 1 else "stop",
                  "message": {"role": "assistant", "content": reply.content}, "logprobs": None}
        if want_logprobs:
            top = sorted(reply.top_logprobs.items(), key=lambda kv: -kv[1])[:n_top]
            first = top[0] if top else (reply.content, 0.0)
            choice["logprobs"] = {"content": [{
                "token": first[0], "logprob": first[1], "bytes": list(first[0].encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
            }]}
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                "choices": [choice],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}}
