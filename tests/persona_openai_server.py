"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for the persona-arm tests.

`reply(request_json, call_index)` returns the assistant text, or an int HTTP status to fail that call with.
Every request body is recorded in `server.requests`. (The judge tests have their own server; to be deduplicated.)
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    index = len(outer.requests)
                    outer.requests.append(body)
                result = outer.reply(body, index)
                if isinstance(result, int):
                    payload = json.dumps({"error": {"message": f"scripted failure {result}", "type": "server_error"}})
                    self.send_response(result)
                else:
                    payload = json.dumps({
                        "id": f"c{index}", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": result}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    })
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
