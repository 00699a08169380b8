"""A small client for OpenAI-compatible servers (vLLM, SGLang, llama.cpp server, hosted APIs, `distill serve`).

Only what `distill generate` needs: list the models, POST a JSON body and get JSON back. Transient failures
(429, 5xx, connection errors, timeouts) are retried with exponential backoff and jitter, honouring the server's
Retry-After; any other 4xx means the request itself is wrong, and retrying it would only repeat the error, so it
stops at once with one line. The API key lives in the client's headers only: it is never logged and never part of
an error message.
"""

from __future__ import annotations

import email.utils
import random
import threading
from collections.abc import Callable
from datetime import datetime, timezone

from distill.errors import DistillError

# A Retry-After longer than this is treated as this: a server asking for an hour would stall a run silently.
MAX_RETRY_AFTER_S = 300.0


def _httpx():
    try:
        import httpx
    except ImportError as e:  # pragma: no cover - httpx is a core dependency
        raise DistillError("an endpoint teacher needs the httpx package: pip install httpx") from e
    return httpx


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The wait a Retry-After header asks for (delta-seconds or an HTTP date), or None when absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff_seconds(attempt: int, base_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base·2^attempt, times a uniform factor in [0.5, 1.5) so that many clients
    hit by the same outage do not retry in lock step."""
    return base_s * (2**attempt) * rng.uniform(0.5, 1.5)


class EndpointRefused(DistillError):
    """A request the server refused (a 4xx other than 429): retrying it would only repeat the error. `status` and
    `detail` (the server's own message) let a caller react to a known refusal (an unsupported parameter)."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status, self.detail = status, detail


def _error_message(response) -> str:
    """The server's own explanation of an error, on one line (OpenAI shape, FastAPI shape, or plain text)."""
    message = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    if not message:
        message = response.text or response.reason_phrase
    message = " ".join(str(message).split())
    return message[:300] + ("..." if len(message) > 300 else "")


class EndpointClient:
    """JSON over HTTP to one OpenAI-compatible base URL (``http://host:8000/v1``); safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        concurrency: int = 8,
        log: Callable[[str], None] = print,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
    ):
        httpx = _httpx()
        if not base_url.startswith(("http://", "https://")):
            raise DistillError(f"recipe key teacher.endpoint: {base_url!r} is not an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.log = log
        self.stopping = threading.Event()  # set when the run is failing: waiting retries give up early
        self.sleep = sleep or self.stopping.wait
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_names(self) -> list[str]:
        body = self.request("GET", "/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise DistillError(f"endpoint {self.base_url}/models: the answer has no model list")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send one request, retrying transient failures; return the JSON answer (an object). `path` is relative
        to the base URL, or a whole URL (vLLM's /tokenize lives at the server's root, not under /v1)."""
        httpx = _httpx()
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                response = self._client.request(method, url, json=body)
            except httpx.TimeoutException:
                reason = f"no answer within {self._timeout_s:g} s"
            except httpx.TransportError as e:
                # Connection refused/reset, DNS, a server that died mid-answer: the server may come back.
                reason = f"{type(e).__name__}: {' '.join(str(e).split()) or 'connection failed'}"
            else:
                status = response.status_code
                if status < 300:
                    try:
                        answer = response.json()
                    except ValueError:
                        raise DistillError(f"endpoint {url}: the answer is not JSON") from None
                    if not isinstance(answer, dict):
                        raise DistillError(f"endpoint {url}: expected a JSON object, got {type(answer).__name__}")
                    return answer
                if status != 429 and status < 500:
                    hint = " (is teacher.endpoint the base URL, ending in /v1?)" if status == 404 else ""
                    detail = _error_message(response)
                    raise EndpointRefused(f"endpoint {url} answered {status}: {detail}{hint}", status, detail)
                reason = f"HTTP {status} ({_error_message(response)})"
                wait = retry_after_seconds(response.headers.get("retry-after"))
            if attempt == self.max_retries or self.stopping.is_set():
                raise DistillError(
                    f"endpoint {url}: {reason}; gave up after {attempt} retries (rerun to continue where it stopped)"
                )
            if wait is None:
                with self._rng_lock:
                    wait = backoff_seconds(attempt, self.backoff_s, self._rng)
            self.log(f"endpoint: {reason}; retry {attempt + 1}/{self.max_retries} in {wait:.1f} s")
            self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover
