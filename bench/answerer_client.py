"""The witness's HTTP client: our urllib client vs the official ``openai`` package.

Issue 19 item 9 asks whether the hand-written client (answerer/openai_compat.py) should give
way to the ``openai`` package (its own timeouts, retries and typed errors). Both clients run
the same batches through ``OpenAIAnswerer``'s batch logic (bounded thread pool, answers
matched by request id, the first final failure stops the batch); only the HTTP layer differs:

- ``urllib``: the module as it is (one connection per request, our retry loop);
- ``openai``: ``openai.OpenAI(max_retries=..., timeout=...)`` with one shared, pooled
  (keep-alive) client, its retry loop, and its typed exceptions mapped to our messages.

The server is a separate process (so it does not share the clients' GIL): a threading
HTTP/1.1 (keep-alive) chat-completions server that answers ``You asked: <question>`` after
``--delay-ms``, and in ``--flaky`` mode fails a seeded share of requests with 503, a
connection reset (RST), or a reply later than the client's timeout.

    PYTHONPATH=src python bench/answerer_client.py --requests 2000 --concurrency 16 64
    PYTHONPATH=src python bench/answerer_client.py --requests 2000 --concurrency 16 --flaky
    PYTHONPATH=src python bench/answerer_client.py --errors

Needs only the project's Python environment (``openai`` is in the lock); no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import socket
import statistics
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llava_reid.answerer.base import AnswerBatchError, AnswerRequest  # noqa: E402
from llava_reid.answerer.openai_compat import OpenAIAnswerer, _Failure  # noqa: E402

# -------------------------------------------------------------------------------------------
# The server (its own process)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def _handler(delay_s: float, flaky: bool, hang_s: float, status: int | None, seed: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as SGLang/vLLM (uvicorn) serve
        disable_nagle_algorithm = True  # as uvicorn: no 40 ms Nagle/delayed-ACK stall

        def log_message(self, fmt, *args):
            pass

        def _send(self, code: int, data: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            rid = self.headers.get("X-Request-ID", "")
            attempt = self.server.attempts.get(rid, 0)
            self.server.attempts[rid] = attempt + 1
            if status == -1:  # one request is refused for good, the others are retried
                if rid.endswith("q0"):
                    return self._send(404, b'{"error": {"message": "no such model"}}')
                return self._send(503, b'{"error": {"message": "overloaded"}}')
            if status is not None:
                if status == 0:  # garbage: a cut-off reply
                    return self._send(200, b'{"choices": [{"message": {"content": "trunc')
                return self._send(status, b"<html><body>Service Unavailable</body></html>",
                                  "text/html")
            if flaky:
                # Seeded by (request id, attempt): both clients meet the same faults.
                u = random.Random(f"{seed}:{rid}:{attempt}").random()
                if u < 0.05:
                    return self._send(503, b'{"error": {"message": "overloaded"}}')
                if u < 0.07:  # connection reset: RST instead of a reply
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if u < 0.08:
                    time.sleep(hang_s)
            if delay_s:
                time.sleep(delay_s)
            question = body["messages"][-1]["content"].rsplit("Question: ", 1)[-1]
            reply = {"id": "c", "object": "chat.completion", "created": 0,
                     "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant",
                                              "content": f"You asked: {question}"}}]}
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
                self._send(200, json.dumps(reply).encode())

    return Handler


def _serve(port_q, delay_s, flaky, hang_s, status, seed) -> None:
    srv = _Server(("127.0.0.1", 0), _handler(delay_s, flaky, hang_s, status, seed))
    srv.attempts = {}
    port_q.put(srv.server_address[1])
    srv.serve_forever()


class Server:
    def __init__(self, *, delay_ms: float = 0.0, flaky: bool = False, hang_s: float = 2.0,
                 status: int | None = None, seed: int = 0):
        q = multiprocessing.get_context("spawn").Queue()
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(q, delay_ms / 1000, flaky, hang_s, status, seed), daemon=True)
        self.proc.start()
        self.base_url = f"http://127.0.0.1:{q.get(timeout=30)}/v1"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join()


# -------------------------------------------------------------------------------------------
# The candidate: the same answerer with the official client's HTTP layer


class OfficialClientAnswerer(OpenAIAnswerer):
    """``OpenAIAnswerer`` whose requests go through ``openai.OpenAI`` (its retries/timeouts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import openai

        self._openai = openai
        from urllib.parse import urlsplit

        loopback = (urlsplit(self.base_url).hostname or "") in {"127.0.0.1", "localhost", "::1"}

        def count(request) -> None:
            with self._count_lock:
                self.requests_sent += 1

        http = openai.DefaultHttpxClient(trust_env=not loopback,
                                         event_hooks={"request": [count]})
        # The library refuses to run without a key; a keyless server ignores the placeholder.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                     max_retries=self.max_retries, timeout=self.timeout_s,
                                     http_client=http)

    def _ask(self, req: AnswerRequest, abort: threading.Event) -> str:
        openai = self._openai
        if abort.is_set():
            raise _Failure("aborted", "batch aborted after another request failed")
        extra = {"seed": self.seed} if self.temperature > 0 else {}
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=self._messages(req), temperature=self.temperature,
                top_p=self.top_p, max_tokens=self.max_tokens, n=1, stream=False,
                extra_headers={"X-Request-ID": req.request_id}, **extra)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise _Failure("auth", str(exc), exc.status_code) from exc
        except openai.APIStatusError as exc:
            text = " ".join(exc.response.text[:300].split())
            raise _Failure("http", text, exc.status_code, self.max_retries + 1) from exc
        except openai.APITimeoutError as exc:
            raise _Failure("timeout", "", None, self.max_retries + 1) from exc
        except openai.APIConnectionError as exc:
            raise _Failure("unreachable", str(exc.__cause__ or exc), None,
                           self.max_retries + 1) from exc
        except ValueError as exc:  # a cut-off reply: the library does not retry it
            raise _Failure("reply", f"reply is not JSON: {exc}") from exc
        return self._clean(reply)

    @staticmethod
    def _clean(reply) -> str:
        from llava_reid.answerer.prompt import clean_reply

        return clean_reply(reply.choices[0].message.content)

    def close(self) -> None:
        self._client.close()


CLIENTS = {"urllib": OpenAIAnswerer, "openai": OfficialClientAnswerer}


def _requests(n: int) -> list[AnswerRequest]:
    return [AnswerRequest(f"q{i}", i, f"What colour was the coat of person {i}?",
                          "I saw a man.", ("q",), ("a",)) for i in range(n)]


# -------------------------------------------------------------------------------------------


def throughput(args) -> list[dict]:
    rows = []
    srv = Server(delay_ms=args.delay_ms, flaky=args.flaky, hang_s=2 * args.timeout_s,
                 seed=args.seed)
    try:
        for conc in args.concurrency:
            for rep in range(args.repeats):
                for name in args.clients:
                    # New request ids per run: the flaky server's faults are seeded by id.
                    reqs = [dataclasses.replace(r, request_id=f"{name}-{conc}-{rep}-{r.request_id}")
                            for r in _requests(args.requests)]
                    a = CLIENTS[name](srv.base_url, "m", max_concurrency=conc,
                                      timeout_s=args.timeout_s, max_retries=args.max_retries,
                                      api_key_env=None)
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    got = a.answer(reqs)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    a.close()
                    row = {"client": name, "concurrency": conc, "repeat": rep,
                           "requests": len(reqs), "flaky": args.flaky, "wall_s": round(wall, 3),
                           "req_per_s": round(len(reqs) / wall, 1),
                           "client_cpu_ms_per_req": round(1000 * cpu / len(reqs), 3),
                           "http_attempts": a.requests_sent,
                           "answers_correct": got == [f"You asked: {r.question}" for r in reqs]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        srv.stop()
    return rows


def errors(args) -> list[dict]:
    """One batch of 4 questions (4 in flight, timeout 0.5 s) per failure kind: the message,
    the HTTP attempts and the time to give up."""
    rows = []
    cases = [("HTTP 503 always", dict(status=503)), ("HTTP 404", dict(status=404)),
             ("HTTP 401", dict(status=401)), ("cut-off JSON reply", dict(status=0)),
             ("one 404 while the others get 503", dict(status=-1)),
             ("reply later than timeout", dict(delay_ms=1000)),
             ("nobody listening", None)]
    for label, kw in cases:
        for name in args.clients:
            if kw is None:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    url, srv = f"http://127.0.0.1:{s.getsockname()[1]}/v1", None
            else:
                srv = Server(**kw)
                url = srv.base_url
            a = CLIENTS[name](url, "m", max_concurrency=4, timeout_s=0.5,
                              max_retries=args.max_retries, api_key_env="BENCH_NO_SUCH_KEY")
            t0 = time.perf_counter()
            try:
                a.answer(_requests(4))
                msg = "(answered)"
            except AnswerBatchError as exc:
                msg = str(exc)
            row = {"case": label, "client": name, "give_up_s": round(time.perf_counter() - t0, 2),
                   "http_attempts": a.requests_sent, "message": msg}
            print(json.dumps(row), flush=True)
            rows.append(row)
            a.close()
            if srv:
                srv.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=0.0, help="server time per reply")
    p.add_argument("--flaky", action="store_true", help="5%% 503, 2%% resets, 1%% late replies")
    p.add_argument("--timeout-s", type=float, default=1.0)
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    p.add_argument("--errors", action="store_true", help="messages of failing batches")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = errors(args) if args.errors else throughput(args)
    if not args.errors:
        for name in args.clients:
            for conc in args.concurrency:
                rs = [r["req_per_s"] for r in rows
                      if r["client"] == name and r["concurrency"] == conc]
                print(f"{name:7s} concurrency {conc:3d}: median {statistics.median(rs):8.1f} "
                      f"req/s over {len(rs)} runs {rs}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "cpus": os.cpu_count(),
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
