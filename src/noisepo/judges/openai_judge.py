"""An LLM judge over any OpenAI-compatible chat API (OpenAI, vLLM, `noisepo serve`, ...).

Each item becomes one chat request with the pointwise 1-100 prompt of METHODS §4.1 (`prompt.py`);
the reply is read by the strict parser (`parsing.py`): anything but a bare number is a failure.

Requests run on a bounded thread pool (`max_concurrency`). Retries are ours, not the client's
(`max_retries=0` on the client), so they are bounded and visible: a 429, a 5xx, a 408, a timeout or
a dropped connection is retried up to `max_retries` times with exponential backoff and full jitter
(a server's `Retry-After` is honoured up to `backoff_max`). Other 4xx fail the item at once; a 401 or
403 stops the run with a ConfigError, since every other request would fail the same way.

The API key is read from the environment variable `api_key_env` and kept in the client only: it is
never printed, logged, put in a repr, an error message, the identity or the cache.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterator

from noisepo.errors import ConfigError
from noisepo.judges.base import Item
from noisepo.judges.parsing import parse_score
from noisepo.judges.prompt import load_template, render_judge_prompt, template_digest

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
NO_KEY = "no-key"  # what we send to servers that take none (the client insists on some string)


class OpenAIJudge:
    """`Scorer` asking a chat model for a 1-100 score per (prompt, response)."""

    def __init__(self, *, base_url: str | None = None, judge_model: str = "gpt-4o-mini",
                 api_key_env: str | None = "OPENAI_API_KEY", template: str | None = None,
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5,
                 backoff_base: float = 1.0, backoff_max: float = 30.0, max_tokens: int = 8,
                 temperature: float = 0.0, sleep: Callable[[float], None] = time.sleep):
        try:
            import openai
        except ImportError:
            raise ConfigError("the openai scorer needs the 'openai' package: pip install 'noisepo[judge]'",
                              key="scorer") from None
        if max_concurrency < 1:
            raise ConfigError(f"must be >= 1, got {max_concurrency}", key="max_concurrency")
        if max_retries < 0:
            raise ConfigError(f"must be >= 0, got {max_retries}", key="max_retries")
        self._openai = openai
        self.base_url = base_url
        self.judge_model = judge_model
        self.template = load_template(template)
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._sleep = sleep
        self._client = openai.OpenAI(api_key=_read_key(api_key_env, base_url), base_url=base_url,
                                     timeout=timeout, max_retries=0)
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self.identity = (f"openai|{base_url or 'https://api.openai.com/v1'}|{judge_model}|"
                         f"template={template_digest(self.template)}|temperature={temperature}|"
                         f"max_tokens={max_tokens}")

    def __repr__(self) -> str:  # the key is deliberately absent
        return (f"OpenAIJudge(base_url={self.base_url!r}, judge_model={self.judge_model!r}, "
                f"max_concurrency={self.max_concurrency})")

    # ------------------------------------------------------------------ Scorer
    def score(self, items: list[Item]) -> list[float | None]:
        scores: list[float | None] = [None] * len(items)
        for index, value in self.score_stream(items):
            scores[index] = value
        return scores

    def score_stream(self, items: list[Item]) -> Iterator[tuple[int, float | None]]:
        """Yield (index, score) as requests finish (in completion order)."""
        if not items:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)),
                                  thread_name_prefix="judge")
        try:
            futures = {pool.submit(self._score_one, prompt, response): i
                       for i, (prompt, response) in enumerate(items)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            # On an error (or the consumer stopping early) do not start the requests still queued.
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ one item
    def _score_one(self, prompt: str, response: str) -> float | None:
        reply = self._ask(render_judge_prompt(self.template, prompt, response))
        if reply is None:
            return None
        value = parse_score(reply)
        self._count("scored" if value is not None else "unparsable")
        return value

    def _ask(self, content: str) -> str | None:
        """The judge's reply text, or None when the request failed for good (retries spent, or an
        error that retrying cannot fix)."""
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            try:
                completion = self._client.chat.completions.create(
                    model=self.judge_model, messages=[{"role": "user", "content": content}],
                    max_tokens=self.max_tokens, temperature=self.temperature)
                self._count("requests")
                return _reply_text(completion)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise ConfigError(f"the judge server refused the API key (HTTP {err.status_code}); "
                                  f"check the variable named by api_key_env", key="api_key_env") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                reason, retry_after = type(err).__name__, None
            except openai.APIStatusError as err:
                if err.status_code not in RETRY_STATUSES:
                    self._count(f"http_{err.status_code}")
                    return None
                reason, retry_after = f"http_{err.status_code}", _retry_after(err)
            except (openai.OpenAIError, ValueError) as err:
                # A 200 whose body is not a chat completion: the server answered, do not retry.
                self._count(f"bad_response_{type(err).__name__}")
                return None
            self._count(reason)
            if attempt < self.max_retries:
                self._count("retries")
                self._sleep(self._backoff(attempt, retry_after))
        self._count("gave_up")
        return None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)], at least the server's Retry-After."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1


def _read_key(api_key_env: str | None, base_url: str | None) -> str:
    """The key from the environment; its value never appears in a message."""
    if not api_key_env:
        return NO_KEY
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_url is not None:
        # Local servers (vLLM, noisepo serve) usually take no key; say so once, without failing.
        log.info("environment variable %s is not set; sending no API key to %s", api_key_env, base_url)
        return NO_KEY
    raise ConfigError(f"environment variable {api_key_env} is not set (it should hold the API key)",
                      key="api_key_env")


def _reply_text(completion) -> str:
    """The first choice's text ("" when the body holds none: an unparsable reply, not a retry)."""
    choices = getattr(completion, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    return getattr(message, "content", None) or ""


def _retry_after(err) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
