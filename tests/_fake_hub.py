"""A loopback HTTP server standing in for the Hugging Face Hub and for plain https mirrors.

It serves what ``huggingface_hub.hf_hub_download`` (2.x) asks for:

* ``HEAD|GET {endpoint}/[datasets/]ORG/REPO/resolve/REV/PATH``: ``X-Repo-Commit`` (40 hex), ``ETag`` (the sha256 of
  an LFS file, quoted), ``Content-Length``; the body on GET. With ``lfs_redirect`` both answer 302 to a "CDN" on
  another origin (``localhost`` instead of ``127.0.0.1``) with ``X-Linked-Etag``/``X-Linked-Size``, as the real Hub
  does for LFS files, and the client must then fetch from the CDN without its Authorization header.
* errors as the Hub words them: ``X-Error-Code: GatedRepo`` with 401/403, ``RepoNotFound``/``EntryNotFound`` 404.
* ``GET /mirror/NAME``: a plain file server (no Hub headers).
* ``GET /api/datasets/ORG/REPO[/revision/REV]`` (repository info: ``sha`` = the commit) and
  ``GET /api/datasets/ORG/REPO/tree/REV[/PATH][?recursive=true]`` (one page of files and folders): what
  ``huggingface_hub.HfFileSystem`` lists with (globs in ``hf://`` paths); every other ``/api/...``: 404.

Bodies honour ``Range: bytes=START-`` and ``bytes=START-END`` (206 + ``Content-Range``; 416 past the end).
``cuts`` makes the next body responses drop the connection after that many bytes (``broken``: every body of a
file, by name); ``throttle`` slows bodies down (to overlap two clients). Every response closes its connection, so a
stopped server really is gone. ``requests`` logs what arrived.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/@]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class FakeHub:
    """Start with ``with FakeHub() as hub:`` (or ``start()``/``stop()``); ``hub.url`` is the endpoint."""

    files: dict[str, bytes] = field(default_factory=dict)  # "datasets/ORG/REPO/PATH" -> bytes
    mirror: dict[str, bytes] = field(default_factory=dict)  # NAME -> bytes
    gated: dict[str, int] = field(default_factory=dict)  # "datasets/ORG/REPO" -> 401 | 403 without the token
    gated_error_code: bool = True  # send X-Error-Code: GatedRepo with the refusal (the real Hub does)
    token: str | None = None  # the token that opens gated repositories
    lfs_redirect: bool = False
    cuts: list[int] = field(default_factory=list)  # drop the next body responses after this many bytes
    broken: dict[str, int] = field(default_factory=dict)  # file name -> every body of it dropped after these bytes
    throttle: float = 0.0  # seconds to sleep per 64 KiB of body
    tamper: bool = False  # flip the first byte of bodies (headers still describe the true file)
    requests: list[Request] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # body bytes written, by file name (last path segment)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- content -----------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, data: bytes, repo_type: str = "dataset") -> str:
        """Serve ``data`` at ``hf://datasets/REPO_ID/PATH``; returns that location."""
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
        self.files[f"{prefix}{repo_id}/{path}"] = data
        return f"hf://{prefix}{repo_id}/{path}"

    def add_mirror(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``{url}/mirror/NAME``; returns that URL."""
        self.mirror[name] = data
        return f"{self.url}/mirror/{name}"

    def body_gets(self, suffix: str = "") -> list[Request]:
        """GET requests that asked for a file body (resolve, cdn or mirror) whose path ends with ``suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "/api/" not in r.path
                    and r.path.endswith(suffix)]

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the hub first"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # --- routing -----------------------------------------------------------------------------------
    def _route(self, body: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        with hub._lock:
            hub.requests.append(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        self.close_connection = True
        if path.startswith("/api/"):
            return self._api(path, urlsplit(self.path).query)
        if path.startswith("/mirror/"):
            data = hub.mirror.get(path[len("/mirror/"):])
            return self._send_data(data, body, {}) if data is not None else self._error(404, {})
        if path.startswith("/cdn/"):
            sha = path[len("/cdn/"):]
            data = next((d for d in hub.files.values() if hashlib.sha256(d).hexdigest() == sha), None)
            return self._send_data(data, body, {}) if data is not None else self._error(404, {})
        m = _RESOLVE.match(path)
        if not m:
            return self._error(404, {"X-Error-Code": "RepoNotFound"})
        kind, repo_id, _rev, fpath = m.groups()
        repo_key = f"{kind + '/' if kind else ''}{repo_id}"
        if not any(k.startswith(repo_key + "/") for k in hub.files):
            return self._error(404, {"X-Error-Code": "RepoNotFound"})
        status = hub.gated.get(repo_key)
        if status and self.headers.get("Authorization") != f"Bearer {hub.token}":
            extra = {"X-Error-Message": f"Access to dataset {repo_id} is restricted."}
            if hub.gated_error_code:
                extra["X-Error-Code"] = "GatedRepo"
            return self._error(status, extra)
        data = hub.files.get(f"{repo_key}/{fpath}")
        if data is None:
            return self._error(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        sha = hashlib.sha256(data).hexdigest()
        if hub.lfs_redirect:
            self.send_response(302)
            for k, v in {"Location": f"http://localhost:{hub.port}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                         "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": '"redirect"',
                         "Content-Length": "0", "Connection": "close"}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send_data(data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"'})

    def _api(self, path: str, query: str) -> None:
        """Repository info and tree listings (HfFileSystem); gated repositories answer as for files."""
        hub = self.hub
        m = re.match(r"^/api/(datasets|spaces|models)/([^/]+/[^/]+?)(?:/revision/[^/]+|/tree/[^/]+(/.*)?)?$", path)
        if not m:
            return self._error(404, {})
        kind, repo_id, sub = m.group(1), m.group(2), (m.group(3) or "").strip("/")
        repo_key = f"{kind}/{repo_id}" if kind != "models" else repo_id
        files = {k[len(repo_key) + 1:]: v for k, v in hub.files.items() if k.startswith(repo_key + "/")}
        if not files:
            return self._error(404, {"X-Error-Code": "RepoNotFound"})
        if hub.gated.get(repo_key) and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(hub.gated[repo_key], {"X-Error-Code": "GatedRepo"})
        if "/tree/" not in path:
            body = {"id": repo_id, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": f} for f in sorted(files)]}
        else:
            recursive = "recursive=true" in query.lower() or "recursive=1" in query
            prefix = sub + "/" if sub else ""
            entries: dict[str, dict] = {}
            for name, data in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix):].split("/")
                for depth in range(1, len(parts)):  # the folders on the way
                    d = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        entries.setdefault(d, {"type": "directory", "path": d, "oid": "0" * 40})
                if recursive or len(parts) == 1:
                    sha = hashlib.sha256(data).hexdigest()
                    entries[name] = {"type": "file", "path": name, "size": len(data), "oid": sha[:40],
                                     "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}}
            if sub and sub not in files and not entries:
                return self._error(404, {"X-Error-Code": "EntryNotFound"})
            body = list(entries.values())
        payload = json.dumps(body).encode()
        self.send_response(200)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                     "X-Repo-Commit": COMMIT, "Connection": "close"}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _error(self, status: int, headers: dict[str, str]) -> None:
        payload = b'{"error": "fake hub error"}'
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(payload)),
                     "Connection": "close"}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_data(self, data: bytes, body: bool, headers: dict[str, str]) -> None:
        size, start = len(data), 0
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        status = 200
        end = size  # exclusive
        if m and body:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size:
                self.send_response(416)
                for k, v in {"Content-Range": f"bytes */{size}", "Content-Length": "0", "Connection": "close",
                             **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            status = 206
        chunk = data[start:end]
        self.send_response(status)
        hdrs = {**headers, "Content-Length": str(len(chunk)), "Accept-Ranges": "bytes", "Connection": "close",
                "Content-Type": "application/octet-stream"}
        if status == 206:
            hdrs["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        with self.hub._lock:
            cut = self.hub.cuts.pop(0) if self.hub.cuts else self.hub.broken.get(name)
        send = chunk if cut is None else chunk[:cut]
        if self.hub.tamper and send:
            send = bytes([send[0] ^ 0xFF]) + send[1:]
        step = 1 << 16
        for i in range(0, len(send), step):
            self.wfile.write(send[i:i + step])
            with self.hub._lock:
                self.hub.served[name] = self.hub.served.get(name, 0) + len(send[i:i + step])
            if self.hub.throttle:
                self.wfile.flush()
                time.sleep(self.hub.throttle)
        self.wfile.flush()
        if cut is not None:  # drop the connection mid-body, as a flaky network does
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def point_hf_at(hub: FakeHub, monkeypatch, hf_cache) -> None:
    """Let a test download from ``hub``: network on, ``HF_ENDPOINT`` set, huggingface_hub's import-time settings
    (offline flag, cache dir) patched for this test, small stream chunks, no agent-registry look-up."""
    import huggingface_hub.constants as hfc
    import huggingface_hub.utils._detect_agent as agent

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_HUB_OFFLINE", "FD_EVAL_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(hf_cache))
    # A cut after some 100 KB then leaves a resumable prefix (the default chunk is 10 MiB).
    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    monkeypatch.setattr(agent, "_registry", agent._EMPTY_REGISTRY)
