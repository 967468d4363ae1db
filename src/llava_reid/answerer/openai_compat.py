"""Witness played by an LLM behind any OpenAI-compatible chat-completions server.

Works with SGLang, vLLM and ``transformers serve``. The original sent the OpenAI *Batch* API
(which current SGLang no longer serves) to a hard-coded address with a mismatched key; here every
question is its own chat-completions request, sent concurrently (bounded), to the configured base
URL with the key from an environment variable, retried with exponential backoff on transient
failures, and matched back to its request by id, never by completion order.

Plain HTTP through the standard library (``urllib``), not the official ``openai`` package:
measured (bench/answerer_client.py) at a fifth of its client CPU per request and 3-4x its
requests/s, with the same answers and error messages, and it does what the package does not
(backoff a failed batch cuts short, retried cut-off replies, no placeholder key).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llava_reid.answerer.base import (
    IDK,
    AnswerBatchError,
    AnswerRequest,
    check_unique_ids,
    too_short,
)
from llava_reid.answerer.prompt import build_messages, clean_reply

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "LLAVA_REID_ANSWERER_API_KEY"
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_CONNECTION_ERRORS = (
    ConnectionError,  # refused, reset, aborted
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
    http.client.BadStatusLine,
    socket.gaierror,
)


@dataclass(eq=False)
class _Failure(Exception):
    """One request's final failure, classified so the batch error can say what to check."""

    kind: str  # "unreachable" | "timeout" | "auth" | "http" | "reply"
    detail: str
    status: int | None = None
    attempts: int = 1


class OpenAIAnswerer:
    """Concurrent chat-completions client playing the witness.

    ``base_url`` includes the API prefix (``http://host:port/v1``). The key is ``api_key`` when
    given (a self-started server), else the value of the environment variable ``api_key_env``;
    with neither, no Authorization header is sent. At most ``max_concurrency`` requests are in
    flight; each waits ``timeout_s`` for its reply and is retried up to ``max_retries`` times
    (exponential backoff from ``backoff_s``) on connection errors, timeouts, 429 and 5xx, never
    on other 4xx. The first request that finally fails stops the batch: queued questions are not
    sent, and ``AnswerBatchError`` carries the answers already received. A reply that is not
    the JSON of a chat completion is retried like a 5xx. ``on_answer(request_id,
    answer)``, if given, is called from the worker threads as each answer arrives.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        max_concurrency: int = 32,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 48,
        idk_min_question_chars: int = 15,
        seed: int = 0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        name: str | None = None,
        on_answer: Callable[[str, str], None] | None = None,
    ):
        if not base_url:
            raise ValueError("answerer.openai.base_url is not set (e.g. http://127.0.0.1:30000/v1)")
        if not model:
            raise ValueError("answerer.openai.model is not set (the model name the server serves)")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        # The key comes from the caller (a self-started server) or the environment, never a file.
        self.api_key = api_key if api_key is not None else (
            os.environ.get(api_key_env) if api_key_env else None)
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_tokens = int(max_tokens)
        self.idk_min_question_chars = int(idk_min_question_chars)
        self.seed = int(seed)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.name = name or f"openai:{model}"
        self.on_answer = on_answer
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # A cluster's http_proxy must not capture requests to a server on this very node.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self.requests_sent = 0  # HTTP attempts made (for tests and logs)
        self._count_lock = threading.Lock()

    # -- one request -------------------------------------------------------------------------

    def _messages(self, req: AnswerRequest) -> list[dict]:
        """The chat messages of one question (the visual answerer sends the image instead)."""
        return build_messages(req.question, req.memory)

    def _body(self, req: AnswerRequest) -> bytes:
        body = {
            "model": self.model,
            "messages": self._messages(req),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "n": 1,
            "stream": False,
        }
        if self.temperature > 0:  # greedy needs no seed; not sending it spares strict servers
            body["seed"] = self.seed
        return json.dumps(body).encode()

    def _headers(self, req: AnswerRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "llava-reid-answerer", "X-Request-ID": req.request_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _post_once(self, req: AnswerRequest) -> str:
        """One HTTP attempt. Returns the cleaned answer or raises (classified below)."""
        with self._count_lock:
            self.requests_sent += 1
        http_req = urllib.request.Request(self.url, data=self._body(req),
                                          headers=self._headers(req), method="POST")
        with self._opener.open(http_req, timeout=self.timeout_s) as resp:
            raw = resp.read()
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise _Failure("reply", f"reply is not JSON: {raw[:200]!r}") from exc
        if isinstance(payload, dict) and payload.get("error"):
            raise _Failure("reply", f"server returned an error: {payload['error']}")
        try:
            content = payload["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Failure("reply", f"reply has no choices[0].message: {raw[:200]!r}") from exc
        return clean_reply(content)

    def _delay(self, req: AnswerRequest, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        base = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        # Jitter spreads retries of many threads; seeded per request so runs repeat exactly.
        jitter = random.Random(f"{self.seed}:{req.request_id}:{attempt}").uniform(0, 0.25)
        return base * (1 + jitter)

    def _ask(self, req: AnswerRequest, abort: threading.Event) -> str:
        """Ask one question with retries; raises ``_Failure`` when it finally fails."""
        last: _Failure | None = None
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise _Failure("aborted", "batch aborted after another request failed")
            retry_after = None
            try:
                return self._post_once(req)
            except urllib.error.HTTPError as exc:
                status = exc.code
                try:
                    text = " ".join(exc.read()[:300].decode(errors="replace").split())
                except Exception:  # noqa: BLE001 - the body is only for the message
                    text = ""
                if status in (401, 403):
                    raise _Failure("auth", text, status) from exc
                if status == 429 or status >= 500:
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    last = _Failure("http", text, status)
                else:
                    raise _Failure("http", text, status) from exc
            except _Failure as exc:
                if exc.kind != "reply":
                    raise
                last = exc  # a garbled reply (cut off, a proxy's page) may not repeat: retry
            except TimeoutError:
                last = _Failure("timeout", f"no reply within {self.timeout_s:g} s")
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    last = _Failure("timeout", f"no reply within {self.timeout_s:g} s")
                else:
                    last = _Failure("unreachable", str(exc.reason))
            except _CONNECTION_ERRORS as exc:
                last = _Failure("unreachable", f"{type(exc).__name__}: {exc}")
            last.attempts = attempt + 1
            if attempt < self.max_retries:
                delay = self._delay(req, attempt, retry_after)
                log.warning("answerer request %s failed (%s: %s); retry %d/%d in %.2f s",
                            req.request_id, last.kind, last.status or last.detail, attempt + 1,
                            self.max_retries, delay)
                if abort.wait(delay):
                    raise _Failure("aborted", "batch aborted after another request failed")
        assert last is not None
        raise last

    # -- the batch ---------------------------------------------------------------------------

    def _message(self, f: _Failure) -> str:
        where = f"answerer server at {self.base_url}"
        if f.kind == "auth":
            env = self.api_key_env or "(none configured)"
            state = ("is not set, so no key was sent" if not self.api_key
                     else "is set, but the server does not accept its value")
            return (f"{where} rejected the API key (HTTP {f.status}): the environment variable "
                    f"{env} (answerer.openai.api_key_env) {state}. Set it to the server's key.")
        if f.kind == "unreachable":
            return (f"{where} is unreachable after {f.attempts} attempt(s) ({f.detail}). Check "
                    f"that the server is running and listening there, that "
                    f"answerer.openai.base_url is right (it usually ends in /v1), and that no "
                    f"firewall or proxy is in the way.")
        if f.kind == "timeout":
            return (f"{where} did not answer within {self.timeout_s:g} s after {f.attempts} "
                    f"attempt(s). The server may be overloaded: lower "
                    f"answerer.openai.max_concurrency or raise answerer.openai.timeout_s.")
        if f.kind == "http":
            hint = ""
            if f.status == 404:
                hint = (" Check answerer.openai.base_url (it usually ends in /v1) and "
                        f"answerer.openai.model ({self.model!r}).")
            elif f.status is not None and (f.status >= 500 or f.status == 429):
                hint = f" It kept failing after {f.attempts} attempt(s)."
            return f"{where} answered HTTP {f.status}: {f.detail.strip()}.{hint}"
        return f"{where} sent an unusable reply: {f.detail}"

    def answer(self, requests: Sequence[AnswerRequest]) -> list[str]:
        check_unique_ids(requests)
        answers: dict[str, str] = {}
        to_ask: list[AnswerRequest] = []
        for r in requests:
            if too_short(r.question, self.idk_min_question_chars):
                answers[r.request_id] = IDK
            else:
                to_ask.append(r)
        if to_ask:
            self._ask_all(to_ask, answers)
        return [answers[r.request_id] for r in requests]

    def _ask_all(self, to_ask: list[AnswerRequest], answers: dict[str, str]) -> None:
        abort = threading.Event()
        failures: list[_Failure] = []
        lock = threading.Lock()

        def work(req: AnswerRequest) -> None:
            try:
                text = self._ask(req, abort)
            except _Failure as f:
                with lock:
                    if f.kind != "aborted":
                        failures.append(f)
                abort.set()  # every other request would fail the same way: stop sending
                return
            with lock:
                answers[req.request_id] = text
            if self.on_answer is not None:
                self.on_answer(req.request_id, text)

        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(to_ask)),
                                  thread_name_prefix="answerer")
        try:
            for fut in [pool.submit(work, r) for r in to_ask]:
                fut.result()
        except BaseException:
            abort.set()  # Ctrl-C or a bug: do not keep sending the queued questions
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        log.info("answerer %s: %d questions in %.2f s (%d HTTP attempts so far)", self.name,
                 len(to_ask), time.perf_counter() - started, self.requests_sent)
        if failures:
            # Auth and configuration problems explain the rest; report them first.
            order = {"auth": 0, "http": 1, "reply": 2, "unreachable": 3, "timeout": 4}
            first = min(failures, key=lambda f: order.get(f.kind, 9))
            got = {r.request_id: answers[r.request_id] for r in to_ask if r.request_id in answers}
            raise AnswerBatchError(
                f"{self._message(first)} ({len(got)} of {len(to_ask)} questions were answered "
                f"before the failure.)", got)

    def close(self) -> None:
        """Nothing to release: connections are per request."""

