"""`noisepo serve`: an OpenAI-compatible chat API over a tiny model, on 127.0.0.1, real HTTP."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from noisepo.config import from_dict
from noisepo.errors import ConfigError

openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the openai client")
pytest.importorskip("fastapi", reason="noisepo serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="noisepo serve needs the 'serve' extra (fastapi, uvicorn)")

KEY = "serve-test-key-5c1e"


@pytest.fixture(scope="module")
def server(micro_model_dir):
    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.models import load_model, load_tokenizer
    from noisepo.serve import ServerThread, create_app

    tokenizer = load_tokenizer(micro_model_dir)
    generator = TransformersGenerator(load_model(micro_model_dir, device="cpu"), tokenizer, progress=False)
    with ServerThread(create_app(generator, tokenizer, model_name="micro", api_key=KEY)) as running:
        yield running


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=30)


def http(method: str, url: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request (no client library in the way)."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ask(server, **options):
    request = dict(model="micro", messages=[{"role": "user", "content": "2+2="}], max_tokens=8)
    request.update(options)
    return client(server).chat.completions.create(**request)


def test_binds_localhost(server):
    from noisepo.serve import ServeConfig

    assert server.host == "127.0.0.1"
    assert from_dict(ServeConfig, {}).host == "127.0.0.1"


def test_models(server):
    assert [m.id for m in client(server).models.list().data] == ["micro"]


def test_chat_completion_honours_the_options(server):
    greedy = ask(server, temperature=0)
    assert greedy.object == "chat.completion" and greedy.model == "micro"
    assert len(greedy.choices) == 1 and isinstance(greedy.choices[0].message.content, str)
    assert greedy.choices[0].message.content == ask(server, temperature=0).choices[0].message.content
    assert greedy.usage.completion_tokens <= 8
    sampled = ask(server, temperature=1.0, n=3, seed=7, max_completion_tokens=6)
    assert len(sampled.choices) == 3
    assert [c.message.content for c in sampled.choices] == [
        c.message.content for c in ask(server, temperature=1.0, n=3, seed=7, max_completion_tokens=6).choices]
    assert all(len(c.message.content) <= 6 for c in sampled.choices)  # one char per token here
    text = ask(server, temperature=0, max_tokens=12).choices[0].message.content
    if len(text) > 2:
        stop = text[2]
        assert ask(server, temperature=0, max_tokens=12, stop=[stop]).choices[0].message.content == text[
            :text.index(stop)]


def test_requests_without_the_key_get_401(server):
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            client(server, key=key or "x").models.list()
    status, body = http("GET", server.url + "/models", key=None)  # no Authorization header at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_bad_requests_get_400(server):
    for body in ({"model": "micro", "messages": []}, {"model": "micro", "messages": [{"role": "user"}]},
                 {"model": "micro", "messages": [{"role": "user", "content": "x"}], "stream": True},
                 {"model": "micro", "messages": [{"role": "user", "content": "x"}], "temperature": -1}):
        status, reply = http("POST", server.url + "/chat/completions", body)
        assert status == 400 and "message" in reply["error"]


def test_config_validation(monkeypatch):
    from noisepo.serve import ServeConfig

    monkeypatch.delenv("NOISEPO_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        from_dict(ServeConfig, {"api_key_env": "NOISEPO_UNSET"})
    assert err.value.key == "api_key_env"
    with pytest.raises(ConfigError):
        from_dict(ServeConfig, {"port": 70000})


def test_module_imports_without_torch_or_fastapi():
    code = "import sys, noisepo.serve; print(any(m in sys.modules for m in ('torch', 'fastapi', 'uvicorn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_serve_command_over_real_http(micro_model_dir, monkeypatch):
    """`python -m noisepo serve` in a subprocess: it prints its URL once listening; then it answers."""
    import os
    import re

    env = {**os.environ, "SERVE_TEST_KEY": KEY, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "noisepo", "serve", "--model", micro_model_dir, "--port", "0",
            "--api-key-env", "SERVE_TEST_KEY", "--device", "cpu"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # printed after the socket is bound and listening
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, process.poll())
        url = match.group(0)
        status, body = http("GET", url + "/models")
        assert status == 200 and body["data"][0]["id"] == micro_model_dir
        assert http("GET", url + "/models", key="wrong")[0] == 401
        status, body = http("POST", url + "/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
        assert status == 200 and len(body["choices"]) == 1
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert KEY not in line + out + err  # the key is never printed or logged
    assert "/v1/models" in out + err  # uvicorn logged the requests, without the key


def test_every_route_refuses_a_request_without_the_right_key_before_any_generation(micro_model_dir):
    """Not only /models: the generating endpoint, the docs and unknown paths too; near-miss keys count as wrong."""
    from noisepo.serve import ServerThread, create_app

    class Counting:
        calls = 0

        def generate(self, prompts, params):
            Counting.calls += 1
            return [["x"] * params.num_samples for _ in prompts]

    from noisepo.models import load_tokenizer

    tokenizer = load_tokenizer(micro_model_dir)
    chat = {"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ServerThread(create_app(Counting(), tokenizer, model_name="micro", api_key=KEY)) as running:
        assert running.socket.getsockname()[0] == "127.0.0.1"
        base = running.url.removesuffix("/v1")
        for key in (None, "", "wrong", KEY[:-1], KEY + "x", KEY.upper()):  # (HTTP strips trailing spaces)
            for method, path, body in (("POST", "/v1/chat/completions", chat), ("GET", "/v1/models", None),
                                       ("GET", "/docs", None), ("GET", "/openapi.json", None),
                                       ("GET", "/v1/nope", None)):
                status, reply = http(method, base + path, body, key=key)
                assert status == 401 and reply["error"]["code"] == "invalid_api_key", (key, path)
                assert KEY not in json.dumps(reply)
        assert Counting.calls == 0  # nothing was generated for a refused request
        assert http("POST", base + "/v1/chat/completions", chat)[0] == 200 and Counting.calls == 1


def test_serve_binds_127_0_0_1_unless_told_otherwise():
    import inspect

    from noisepo.serve import ServeConfig, ServerThread

    assert from_dict(ServeConfig, {"model": "m"}).host == "127.0.0.1"
    assert inspect.signature(ServerThread).parameters["host"].default == "127.0.0.1"
