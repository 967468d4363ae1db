"""The witness page: a standard-library HTTP server in front of one loaded run.

One static page (``static/``) talks JSON to this server; the server holds the models (loaded
once) and the sessions, and serves gallery images by id only (no file path from the client is
ever opened). It binds 127.0.0.1 unless told otherwise; when the access-token environment
variable is set, every request needs the token (a ``?token=`` visit sets a cookie, or an
``Authorization: Bearer`` header).
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import os
import re
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from llava_reid.witness.models import WitnessModels
from llava_reid.witness.session import WitnessSession

log = logging.getLogger(__name__)

TOKEN_ENV = "LLAVA_REID_DEMO_TOKEN"
COOKIE = "llava_reid_demo"
MAX_BODY = 64 * 1024
MAX_SESSIONS = 256
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
SESSION_PATH = re.compile(r"^/api/sessions/([\w-]+)(?:/(answer|finish))?$")


class BadRequest(ValueError):
    pass


class WitnessApp:
    """The server's state: the loaded run, its sessions, the token and the static files."""

    def __init__(self, models: WitnessModels, sessions_dir: Path, top_k: int,
                 token: str | None = None):
        self.models, self.sessions_dir, self.top_k = models, sessions_dir, top_k
        self.token = token or None
        self.sessions: OrderedDict[str, WitnessSession] = OrderedDict()
        self.sessions_lock = threading.Lock()
        self.static = {path: (resources.files("llava_reid.witness").joinpath(
            "static", name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}
        g = models.gallery
        self.image_paths = {int(i): models.files.image_root / p
                            for i, p in zip(g.image_idx.tolist(), g.file_paths, strict=True)}

    def info(self) -> dict[str, Any]:
        m = self.models
        q = m.test_queries
        return {"label": m.label, "method": m.files.method, "run": str(m.files.run),
                "rounds": m.rounds, "top_k": self.top_k, "gallery": len(m.gallery),
                "device": str(m.gallery.device), "replay_compare": m.simulated is not None,
                "queries": [{"query_id": int(a), "initial": str(b)} for a, b in
                            zip(q["query_id"], q["initial_description"], strict=True)]}

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        query_id = body.get("query_id")
        if query_id is not None and not isinstance(query_id, int):
            raise BadRequest("query_id must be an integer")
        description = body.get("description")
        if query_id is None and not (isinstance(description, str) and description.strip()):
            raise BadRequest("type a first description of the person (or pick a test query)")
        try:
            session = WitnessSession.start(self.models, description, query_id,
                                           self.sessions_dir, self.top_k)
        except KeyError as exc:
            raise BadRequest(str(exc.args[0])) from exc
        with self.sessions_lock:
            self.sessions[session.session_id] = session
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return session.view()

    def session(self, session_id: str) -> WitnessSession:
        with self.sessions_lock:
            if session_id not in self.sessions:
                raise BadRequest(f"no session {session_id} (the server may have restarted)")
            return self.sessions[session_id]

    def act(self, session_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        session = self.session(session_id)
        try:
            if action == "answer":
                answer = body.get("answer", "")
                if not isinstance(answer, str) or len(answer) > 2000:
                    raise BadRequest("answer must be text (at most 2000 characters)")
                session.answer(answer)
            else:
                picked = body.get("image_idx")
                if picked is not None and not isinstance(picked, int):
                    raise BadRequest("image_idx must be an integer")
                session.finish(picked)
        except (KeyError, ValueError) as exc:
            raise BadRequest(str(exc.args[0] if exc.args else exc)) from exc
        return session.view()

    def authorised(self, handler: BaseHTTPRequestHandler) -> bool:
        if self.token is None:
            return True
        given = []
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:].strip())
        cookie = SimpleCookie(handler.headers.get("Cookie", ""))
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)


def make_handler(app: WitnessApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "llava-reid-witness"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def send(self, status: int, body: bytes, ctype: str,
                 headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; img-src 'self'; frame-ancestors 'none'")
            for k, v in ({"Cache-Control": "no-store"} | (headers or {})).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, obj: Any, status: int = 200) -> None:
            self.send(status, json.dumps(obj).encode(), "application/json")

        def gate(self, url) -> bool:
            """True when the request may go on; else the refusal is sent."""
            if app.authorised(self):
                return True
            token = parse_qs(url.query).get("token", [""])[0]
            if app.token and url.path == "/" and hmac.compare_digest(token.encode(),
                                                                     app.token.encode()):
                cookie = f"{COOKIE}={app.token}; HttpOnly; SameSite=Strict; Path=/"
                self.send(HTTPStatus.SEE_OTHER, b"", "text/plain",
                          {"Location": "/", "Set-Cookie": cookie})
                return False
            self.send(HTTPStatus.UNAUTHORIZED, b"access token required: open /?token=...\n",
                      "text/plain; charset=utf-8")
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if not self.gate(url):
                return
            if url.path in app.static:
                body, ctype = app.static[url.path]
                self.send(200, body, ctype)
            elif url.path == "/api/info":
                self.send_json(app.info())
            elif url.path.startswith("/image/"):
                self.image(url.path.removeprefix("/image/"))
            elif (match := SESSION_PATH.match(url.path)) and not match.group(2):
                self.run_api(lambda: app.session(match.group(1)).view())
            else:
                self.send_json({"error": f"not found: {url.path}"}, 404)

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if not self.gate(url):
                return
            try:
                body = self.read_json()
            except BadRequest as exc:
                self.send_json({"error": str(exc)}, 400)
                return
            if url.path == "/api/sessions":
                self.run_api(lambda: app.start(body))
            elif (match := SESSION_PATH.match(url.path)) and match.group(2):
                self.run_api(lambda: app.act(match.group(1), match.group(2), body))
            else:
                self.send_json({"error": f"not found: {url.path}"}, 404)

        def read_json(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                raise BadRequest(f"request body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            return body

        def run_api(self, call) -> None:
            try:
                self.send_json(call())
            except BadRequest as exc:
                self.send_json({"error": str(exc)}, 400)
            except Exception as exc:  # keep serving; the log has the trace
                log.exception("request %s failed", self.path)
                self.send_json({"error": f"internal error: {exc}"}, 500)

        def image(self, ident: str) -> None:
            path = app.image_paths.get(int(ident)) if ident.isdigit() else None
            if path is None or not path.is_file():
                self.send_json({"error": f"no gallery image {ident}"}, 404)
                return
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.send(200, path.read_bytes(), ctype, {"Cache-Control": "max-age=3600"})

    return Handler


def serve(app: WitnessApp, host: str, port: int, ready=None) -> None:
    """Serve until interrupted; ``ready(url)`` runs once the socket listens."""
    httpd = ThreadingHTTPServer((host, port), make_handler(app))
    httpd.daemon_threads = True
    url = f"http://{host if host not in ('0.0.0.0', '::') else 'localhost'}:" \
          f"{httpd.server_address[1]}/"
    if ready is not None:
        ready(url)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def token_from_env(name: str = TOKEN_ENV) -> str | None:
    return os.environ.get(name) or None


def sessions_dir_for(run: Path, given: str | None) -> Path:
    return Path(given) if given else run / "witness" / "sessions"
