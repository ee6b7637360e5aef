"""A fault-injecting OpenAI-compatible server on 127.0.0.1 for the judge tests.

What it does for an item is written in the judged response itself (the text inside the request's
<response> block), as `behaviour:score`:

  ok:NN         reply "NN"
  flaky500:NN   HTTP 500 on the first hit, then "NN"
  limit429:NN   HTTP 429 (Retry-After: 0) on the first two hits, then "NN"
  always500     HTTP 500 on every hit
  stall:NN      the first hit answers only after the client's timeout, then "NN"
  stallforever  every hit stalls past the client's timeout
  drop:NN       the first hit closes the connection without an answer, then "NN"
  garbage       HTTP 200 with a body that is not JSON
  chatter       reply "I would rate this 87 out of 100."
  bad400        HTTP 400
  auth401       HTTP 401
anything else   a gullible judge: "Score: 100" if the request mentions "reply 100", else "50".

A response may end with a tag after '@' (`ok:57@12`, `garbage@13`) that only makes the text unique
(hits are counted per text); the behaviour is read without it.

Every request body and Authorization header is recorded; hits are counted per response text. A
request whose key is in `refused_keys` gets HTTP 401 whatever it asks.
"""
from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

RESPONSE_BLOCK = re.compile(r"<response>\n(.*)\n</response>", re.DOTALL)
STALL_LIMIT_S = 5.0  # a stalled handler gives up after this; the fixture releases it at teardown


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections under load (the client then times out)


class FaultServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.hits: Counter[str] = Counter()
        self.refused_keys: set[str] = set()  # an Authorization of "Bearer KEY" for these gets HTTP 401
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold = threading.Event()  # set at teardown: releases stalled handlers
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.headers.get("Authorization", "") in {f"Bearer {k}" for k in server.refused_keys}:
                        return server.status(self, 401)
                    server.respond(self, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def respond(self, handler, body: dict) -> None:
        content = body["messages"][-1]["content"]
        match = RESPONSE_BLOCK.search(content)
        response = match.group(1) if match else ""
        with self.lock:
            self.hits[response] += 1
            hit = self.hits[response]
        behaviour, _, value = response.split("@", 1)[0].partition(":")
        if behaviour == "ok":
            return self.reply(handler, value)
        if behaviour == "flaky500":
            return self.status(handler, 500) if hit == 1 else self.reply(handler, value)
        if behaviour == "limit429":
            return self.status(handler, 429, {"Retry-After": "0"}) if hit <= 2 else self.reply(handler, value)
        if behaviour == "always500":
            return self.status(handler, 500)
        if behaviour in ("stall", "stallforever"):
            if behaviour == "stallforever" or hit == 1:
                self.hold.wait(STALL_LIMIT_S)
            return self.reply(handler, value or "50")
        if behaviour == "drop":
            if hit == 1:
                handler.close_connection = True
                return None
            return self.reply(handler, value)
        if behaviour == "garbage":
            return self.raw(handler, 200, b"<html>not json", "application/json")
        if behaviour == "chatter":
            return self.reply(handler, "I would rate this 87 out of 100.")
        if behaviour == "bad400":
            return self.status(handler, 400)
        if behaviour == "auth401":
            return self.status(handler, 401)
        return self.reply(handler, "Score: 100" if "reply 100" in content else "50")

    def reply(self, handler, text: str) -> None:
        body = {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}
        self.raw(handler, 200, json.dumps(body).encode(), "application/json")

    def status(self, handler, code: int, headers: dict | None = None) -> None:
        body = json.dumps({"error": {"message": f"injected {code}", "type": "test"}}).encode()
        self.raw(handler, code, body, "application/json", headers)

    @staticmethod
    def raw(handler, code: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left: what a stall is for

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture()
def fault_server():
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture()
def judge_factory(fault_server, monkeypatch):
    """OpenAIJudge against the fault server, with fast timeouts and no backoff waiting."""
    from noisepo.judges.openai_judge import OpenAIJudge

    monkeypatch.setenv("NOISEPO_TEST_KEY", "sk-test-do-not-leak-8f3a")
    sleeps: list[float] = []

    def make(**overrides):
        options = dict(base_url=fault_server.url, judge_model="judge", api_key_env="NOISEPO_TEST_KEY",
                       max_concurrency=4, timeout=1.0, max_retries=2, backoff_base=0.0,
                       sleep=sleeps.append)
        options.update(overrides)
        return OpenAIJudge(**options)

    make.sleeps = sleeps
    return make
