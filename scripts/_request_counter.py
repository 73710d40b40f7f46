"""Count the HTTP requests that reach a storage API server, client-agnostic.

A `CountingProxy` is a small HTTP/1.1 reverse proxy on 127.0.0.1 that forwards every
request unchanged to one real server (moto's S3 server, fake-gcs-server, ...) and records
it. Point the clients at the proxy (`AWS_ENDPOINT_URL`, `STORAGE_EMULATOR_HOST`) and every
request any client makes (s3fs, gcsfs, boto3, google-cloud-storage, pyarrow's C++ S3
client) is counted as the server sees it: retries, HEADs, listings and server-side copies
included. Nothing is mocked: the requests still go to the real server.

    with count_requests() as c:
        commit.publish_shard(layout, result)
    c.total, c.by_method, c.by_kind, c.peak_concurrency, c.bytes_up

`count_requests()` counts through every proxy started in this process; pass `store="s3"`
(the proxy's name) to count one. Standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect", "content-length"}
_ACTIVE: list["RequestCount"] = []
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Request:
    store: str  # the proxy's name: "s3", "gcs", ...
    method: str
    path: str  # without the query
    query: str
    status: int
    bytes_up: int  # request body bytes (client → server)
    bytes_down: int  # response body bytes (server → client)
    copy_source: str | None  # S3 `x-amz-copy-source` header, if any
    start: float
    end: float

    @property
    def kind(self) -> str:
        return classify(self)


def classify(r: Request) -> str:
    """A storage operation name for a request: get, head, list, put, copy, move, delete, ..."""
    q = urllib.parse.parse_qs(r.query, keep_blank_values=True)
    m = r.method
    if r.path.startswith(("/storage/v1/", "/upload/storage/v1/", "/download/storage/v1/", "/batch/")):  # GCS JSON API
        p = r.path
        if p.startswith("/batch/"):
            return "batch"
        if "/rewriteTo/" in p or "/copyTo/" in p:
            return "copy"
        if "/moveTo/" in p:
            return "move"
        if p.endswith("/compose"):
            return "compose"
        if p.startswith("/upload/"):
            return "upload" if m == "POST" else "upload_chunk"
        if p.startswith("/download/") or q.get("alt") == ["media"]:
            return "get"
        parts = p[len("/storage/v1/"):].split("/")  # b/<bucket>[/o[/<object>]]
        if m == "GET" and len(parts) == 3 and parts[2] == "o":
            return "list"
        if m == "GET" and len(parts) <= 2:
            return "bucket_info"
        return {"GET": "info", "DELETE": "delete", "PATCH": "patch", "PUT": "update", "POST": "post"}.get(m, m.lower())
    # S3 REST API (path style: /<bucket>[/<key>])
    key = r.path.lstrip("/").partition("/")[2]
    if m == "PUT":
        if "uploadId" in q:
            return "upload_part_copy" if r.copy_source else "upload_part"
        return "copy" if r.copy_source else ("put" if key else "create_bucket")
    if m == "POST":
        if "delete" in q:
            return "delete_batch"
        if "uploads" in q:
            return "mpu_create"
        if "uploadId" in q:
            return "mpu_complete"
        return "post"
    if m == "GET":
        return "get" if key and "uploadId" not in q else "list"
    if m == "HEAD":
        return "head"
    if m == "DELETE":
        return "mpu_abort" if "uploadId" in q else "delete"
    return m.lower()


@dataclass
class RequestCount:
    """The requests seen while a `count_requests()` block ran."""

    store: str | None = None
    requests: list[Request] = field(default_factory=list)
    peak_concurrency: int = 0
    _in_flight: int = 0

    @property
    def total(self) -> int:
        return len(self.requests)

    @property
    def by_method(self) -> dict[str, int]:
        return dict(collections.Counter(r.method for r in self.requests))

    @property
    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(r.kind for r in self.requests))

    @property
    def by_store(self) -> dict[str, int]:
        return dict(collections.Counter(r.store for r in self.requests))

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.requests)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.requests)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items(), key=lambda kv: -kv[1]))
        return f"{self.total} requests ({kinds}); peak {self.peak_concurrency} in flight; {self.bytes_up} B up, {self.bytes_down} B down"


@contextlib.contextmanager
def count_requests(store: str | None = None):
    """Count the requests that pass through this process's `CountingProxy`s (or the one named `store`)."""
    c = RequestCount(store=store)
    with _LOCK:
        _ACTIVE.append(c)
    try:
        yield c
    finally:
        with _LOCK:
            _ACTIVE.remove(c)


def _begin(store: str) -> list[RequestCount]:
    with _LOCK:
        counts = [c for c in _ACTIVE if c.store in (None, store)]
        for c in counts:
            c._in_flight += 1
            c.peak_concurrency = max(c.peak_concurrency, c._in_flight)
        return counts


def _end(counts: list[RequestCount], req: Request) -> None:
    with _LOCK:
        for c in counts:
            c._in_flight -= 1
            c.requests.append(req)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered by the base class

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self):
        proxy: CountingProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        path, _, query = self.path.partition("?")
        counts = _begin(proxy.name)
        start = time.perf_counter()
        status, reason, headers, data = proxy._send(self.command, self.path, [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP], body)
        end = time.perf_counter()
        _end(counts, Request(proxy.name, self.command, path, query, status, len(body), len(data), self.headers.get("x-amz-copy-source"), start, end))
        self.send_response_only(status, reason)
        length = None
        for k, v in headers:
            lk = k.lower()
            if lk == "content-length":
                length = v
            if lk in _HOP:
                continue
            if lk == "location":
                v = v.replace(proxy.upstream, proxy.url)
            self.send_header(k, v)
        if self.command == "HEAD":
            if length is not None:
                self.send_header("Content-Length", length)  # the object's size, which clients read from a HEAD
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _forward


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: not news
            super().handle_error(request, client_address)


class CountingProxy:
    """A reverse proxy on 127.0.0.1 in front of `upstream` (`http://127.0.0.1:PORT`) that counts requests.

    Started on `port` (0: a free one); `url` is where clients should point.
    """

    def __init__(self, upstream: str, name: str, port: int = 0):
        self.upstream = upstream.rstrip("/")
        self.name = name
        u = urllib.parse.urlsplit(self.upstream)
        self._host, self._port = u.hostname, u.port
        self._local = threading.local()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def _send(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        for attempt in (0, 1):  # a kept-alive upstream connection the server closed: reconnect once
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=120)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                if body or method in ("PUT", "POST", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    conn.close()
                    self._local.conn = None
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise

    def start(self) -> "CountingProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"counting-proxy-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
