"""An LLM judge over any OpenAI-compatible chat API (OpenAI, vLLM, `noisepo serve`, ...).

`OpenAIJudge` (pointwise) sends each item as one chat request with the 1-100 prompt of METHODS §4.1;
`OpenAIPairwiseJudge` sends each (prompt, response_a, response_b) with the "A or B" prompt
(`prompt.py`). The reply is read by the strict parsers (`parsing.py`): anything but a bare number,
or a bare letter, is unparsable.

Requests run on a bounded thread pool (`max_concurrency`). Retries are ours, not the client's
(`max_retries=0` on the client), so they are bounded and visible: each item gets at most
1 + `max_retries` requests, whatever went wrong. A 429, a 5xx, a 408, a timeout or a dropped
connection is retried with exponential backoff and full jitter (a server's `Retry-After` is
honoured up to `backoff_max`). An unparsable reply, and a 200 whose body is not a chat completion,
is retried at once: it says nothing about load, and a sampled judge, or a server that glitched,
often answers properly the next time (issue 21: 154 of 200 pairs scored under 30 % faults when
such replies were final). Other 4xx fail the item at once; a 401 or 403 stops the run with a
ConfigError, since every other request would fail the same way.

`stats` counts events (requests answered, each error kind, `retries`, `unparsable_retries`);
`failure_reasons` counts each failed item once, by the reason of its last attempt.

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
from noisepo.judges.common import UNPARSABLE, Item, PairItem
from noisepo.judges.parsing import parse_choice, parse_score
from noisepo.judges.prompt import (
    DEFAULT_TEMPLATE,
    PAIRWISE_FIELDS,
    PAIRWISE_TEMPLATE,
    POINTWISE_FIELDS,
    load_template,
    render_judge_prompt,
    render_pairwise_prompt,
    template_digest,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
NO_KEY = "no-key"  # what we send to servers that take none (the client insists on some string)
BAD_RESPONSE = "bad_response"  # HTTP 200 whose body is not a chat completion


class _ChatJudge:
    """The request, retry and parse machinery both judges share; subclasses say how an item becomes
    a prompt (`_render`) and how a reply becomes a value (`_parse`)."""

    kind = "openai"
    fields = POINTWISE_FIELDS
    default_template = DEFAULT_TEMPLATE

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
        self.template = load_template(template, fields=self.fields, default=self.default_template)
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
        self.failure_reasons: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self.identity = (f"{self.kind}|{base_url or 'https://api.openai.com/v1'}|{judge_model}|"
                         f"template={template_digest(self.template)}|temperature={temperature}|"
                         f"max_tokens={max_tokens}")

    @classmethod
    def from_config(cls, options):
        return cls(base_url=options.base_url, judge_model=options.judge_model, api_key_env=options.api_key_env,
                   template=options.template, max_concurrency=options.max_concurrency, timeout=options.timeout,
                   max_retries=options.max_retries, max_tokens=options.max_new_tokens)

    def __repr__(self) -> str:  # the key is deliberately absent
        return (f"{type(self).__name__}(base_url={self.base_url!r}, judge_model={self.judge_model!r}, "
                f"max_concurrency={self.max_concurrency})")

    def _render(self, item: tuple[str, ...]) -> str:
        raise NotImplementedError

    def _parse(self, reply: str) -> float | None:
        raise NotImplementedError

    # ------------------------------------------------------------------ many items
    def _all(self, items: list) -> list[float | None]:
        values: list[float | None] = [None] * len(items)
        for index, value in self._stream(items):
            values[index] = value
        return values

    def _stream(self, items: list) -> Iterator[tuple[int, float | None]]:
        """Yield (index, value) as items finish (in completion order)."""
        if not items:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)),
                                  thread_name_prefix="judge")
        try:
            futures = {pool.submit(self._judge, self._render(item)): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            # On an error (or the consumer stopping early) do not start the requests still queued.
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ one item
    def _judge(self, content: str) -> float | None:
        """The parsed reply to `content`, or None (counted in `failure_reasons`) when no request of
        the 1 + max_retries allowed gave a readable answer, or one failed in a way retrying cannot fix."""
        openai = self._openai
        reason, retry_after = None, None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                if reason in (UNPARSABLE, BAD_RESPONSE):
                    self._count("unparsable_retries")  # asked again at once: not a sign of load
                else:
                    self._sleep(self._backoff(attempt - 1, retry_after))
            retry_after = None
            try:
                completion = self._client.chat.completions.create(
                    model=self.judge_model, messages=[{"role": "user", "content": content}],
                    max_tokens=self.max_tokens, temperature=self.temperature)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise ConfigError(f"the judge server refused the API key (HTTP {err.status_code}); "
                                  f"check the variable named by api_key_env", key="api_key_env") from None
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                reason = type(err).__name__
            except openai.APIStatusError as err:
                reason = f"http_{err.status_code}"
                if err.status_code not in RETRY_STATUSES:
                    self._count(reason)
                    return self._fail(reason)
                retry_after = _retry_after(err)
            except (openai.OpenAIError, ValueError):
                reason = BAD_RESPONSE  # a 200 whose body is not a chat completion
            else:
                self._count("requests")
                reply = _reply_text(completion)
                value = self._parse(reply)
                if value is not None:
                    self._count("scored")
                    return value
                log.debug("unparsable judge reply %r", reply[:200])
                reason = UNPARSABLE
            self._count(reason)
        return self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self._stats_lock:
            self.failure_reasons[reason] += 1
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


class OpenAIJudge(_ChatJudge):
    """`Scorer` asking a chat model for a 1-100 score per (prompt, response)."""

    def score(self, items: list[Item]) -> list[float | None]:
        return self._all(items)

    def score_stream(self, items: list[Item]) -> Iterator[tuple[int, float | None]]:
        """Yield (index, score) as requests finish (in completion order)."""
        return self._stream(items)

    def _render(self, item: Item) -> str:
        return render_judge_prompt(self.template, *item)

    def _parse(self, reply: str) -> float | None:
        return parse_score(reply)


class OpenAIPairwiseJudge(_ChatJudge):
    """`Comparer` asking a chat model which of two responses is better: "A" -> 1.0, "B" -> 0.0.
    One order per item: the caller asks both orders (the position swap of DSL's pairwise mode)."""

    kind = "openai-pairwise"
    fields = PAIRWISE_FIELDS
    default_template = PAIRWISE_TEMPLATE

    def compare(self, items: list[PairItem]) -> list[float | None]:
        return self._all(items)

    def compare_stream(self, items: list[PairItem]) -> Iterator[tuple[int, float | None]]:
        """Yield (index, P(A beats B)) as requests finish (in completion order)."""
        return self._stream(items)

    def _render(self, item: PairItem) -> str:
        return render_pairwise_prompt(self.template, *item)

    def _parse(self, reply: str) -> float | None:
        return parse_choice(reply)


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
    """The first choice's text ("" when the body holds none: an unparsable reply)."""
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
