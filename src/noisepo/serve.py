"""`noisepo serve`: a local model behind an OpenAI-compatible chat API (extra 'serve').

Endpoints: `GET /v1/models` and `POST /v1/chat/completions` (non-streaming). The messages are
rendered with `noisepo.data.chat.render_prompt`, the template training uses, and decoded by
`TransformersGenerator`; `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `n`, `seed`
and `stop` are honoured. It binds 127.0.0.1 unless told otherwise. With `--api-key-env VAR` every
request must carry `Authorization: Bearer <value of VAR>` or gets 401.

Requests are decoded one at a time (a lock around the model): simple and safe for the judge and
test traffic this is for; use vLLM's server for throughput.

torch, fastapi and uvicorn are imported inside the functions, so this module imports fast.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noisepo.config import option
from noisepo.errors import ConfigError

if TYPE_CHECKING:
    from noisepo.generation.base import Generator

DEFAULT_MAX_TOKENS = 64


@dataclass
class ServeConfig:
    """`noisepo serve`: an OpenAI-compatible chat server over a local model."""

    model: str = option("tiny", "A local model folder, a hub name, or a preset (micro, tiny, small; "
                                "built once into --build-dir).")
    tokenizer: str | None = option(None, "Tokenizer folder or hub name, for a --model folder saved without "
                                         "one: joined with the model's files in --build-dir.")
    port: int = option(8000, "TCP port (0: any free port, printed at start).")
    host: str = option("127.0.0.1", "Interface to bind; 127.0.0.1 keeps the server local. Use 0.0.0.0 "
                                    "only on a trusted network, with --api-key-env.")
    api_key_env: str | None = option(None, "Environment variable holding the API key clients must send "
                                           "as 'Authorization: Bearer KEY'; null: no key needed.")
    served_model_name: str | None = option(None, "Model id reported by /v1/models (default: --model).")
    batch_size: int = option(8, "Most sequences decoded at once (n samples of one request).")
    dtype: str = option("auto", "Weights dtype: auto, float32, bfloat16, float16.")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available).")
    trust_remote_code: bool = option(False, "Allow model code from the hub/folder to run (off: safer).")
    build_dir: str = option("runs/serve-model", "Where a preset model is built (reused when present).")

    def __post_init__(self):
        if not self.model:
            raise ConfigError("is required (a model folder, hub name or preset)", key="model")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be in 0..65535, got {self.port}", key="port")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", key="batch_size")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(f"environment variable {self.api_key_env} is not set", key="api_key_env")


def run_serve(config: ServeConfig) -> int:
    import socket

    import uvicorn

    from noisepo.generation.transformers_backend import TransformersGenerator
    from noisepo.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(config.model, config.build_dir, tokenizer=config.tokenizer,
                         trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    model = load_model(path, dtype=config.dtype, device=config.device,
                       trust_remote_code=config.trust_remote_code)
    generator = TransformersGenerator(model, tokenizer, batch_size=config.batch_size, progress=False)
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    app = create_app(generator, tokenizer, model_name=config.served_model_name or config.model,
                     api_key=api_key)
    sock = socket.create_server((config.host, config.port))
    print(f"noisepo serve: {config.model} on http://{config.host}:{sock.getsockname()[1]}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


def create_app(generator: Generator, tokenizer, *, model_name: str, api_key: str | None = None):
    """The FastAPI app; `generator` may be any `Generator` (tests pass stubs)."""
    import hmac
    import time
    import uuid

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from noisepo.data.chat import render_prompt
    from noisepo.errors import NoisepoError
    from noisepo.generation.base import GenerationParams

    app = FastAPI(title="noisepo serve")
    lock = threading.Lock()
    created = int(time.time())

    def error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None:
            sent = request.headers.get("authorization", "")
            expected = f"Bearer {api_key}"
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                return error(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                             "invalid_request_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "noisepo"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict):
        try:
            messages, params = _read_request(body, GenerationParams)
            prompt = render_prompt(tokenizer, messages)
        except (NoisepoError, TypeError, ValueError) as err:
            return error(400, str(err), "invalid_request_error")
        with lock:
            samples = generator.generate([prompt], params)[0]
        return _completion(samples, prompt, params, tokenizer, model_name,
                           f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))

    return app


def _read_request(body: dict, params_cls):
    """(messages, GenerationParams) from an OpenAI chat request body; ValueError when malformed."""
    import secrets

    if body.get("stream"):
        raise ValueError("stream=true is not supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a string 'role' and a string 'content'")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    seed = body.get("seed")
    # OpenAI's defaults: temperature 1, top_p 1; no seed means a fresh draw per request.
    params = params_cls(
        max_new_tokens=int(max_tokens),
        temperature=float(1.0 if body.get("temperature") is None else body["temperature"]),
        top_p=float(1.0 if body.get("top_p") is None else body["top_p"]),
        num_samples=int(body.get("n") or 1),
        seed=int(seed) if seed is not None else secrets.randbits(31),
        stop=[str(s) for s in stop],
    )
    return messages, params


def _completion(samples: list[str], prompt: str, params, tokenizer, model_name: str, request_id: str,
                created: int) -> dict:
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    choices, completion_tokens = [], 0
    for index, text in enumerate(samples):
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        completion_tokens += tokens
        # Approximate: a reply that used the whole budget most likely ran out of it.
        finish = "length" if tokens >= params.max_new_tokens else "stop"
        choices.append({"index": index, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": finish})
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on 127.0.0.1 (tests, notebooks).

    The socket is bound and listening before the thread starts, so requests made right away wait
    in the listen queue instead of failing: no readiness polling needed. `stop()` shuts it down.
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.socket = socket.create_server((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True, name="noisepo-serve")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()
