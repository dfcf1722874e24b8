"""A fault-injecting HTTP proxy on 127.0.0.1 for tests: clients use its URL as their S3
endpoint (AWS_ENDPOINT_URL) or MLflow tracking URI and it forwards each request to the real
endpoint (moto, `mlflow server`), except where a scheduled fault says otherwise:

    slowdown   answer 503 SlowDown with S3's XML error body (the request never reaches S3)
    cut        forward, send the headers (Content-Length kept) and `after_bytes` of the body, close
    stall      forward, send `after_bytes` of the body (0: nothing, not even the headers), wait
               `seconds`, then send the rest
    stall_upload  read `after_bytes` of the request's body, wait `seconds` reading nothing more (the
               client's send blocks, as on a network path gone silent), then drop the connection
               unanswered: the request never reaches S3 (e.g. UploadPart: `PUT ...?partNumber=`)

A fault applies to the next `times` requests (None: every one) matching its method and path
pattern; `injected` counts what was done, `requests` what came in. A cut or stall may call `then()`
once its first `after_bytes` are sent, before it goes on (e.g. to replace the object: the client's
next request sees the new one). Uploads the AWS C++ SDK sends (pyarrow: `Transfer-Encoding:
chunked` bodies in `aws-chunked` encoding, `Expect: 100-continue`, which http.server answers) are
forwarded whole, with a Content-Length. Bounded: socket timeouts, daemon threads, stalls that
end at stop(), and stop() also cuts the connections clients keep alive (an outage is an outage).
`upload_bytes_per_s` limits how fast each request's body is read (a slow uplink; None: no limit).
"""

from __future__ import annotations

import collections
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SOCKET_TIMEOUT_S = 30.0
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}


@dataclass
class Fault:
    kind: str  # "slowdown", "cut", "stall" or "stall_upload"
    times: int | None = 1  # how many matching requests get it; None = all of them
    method: str = ""  # "GET", "PUT", ...; "" = any
    path: str = ""  # a regex searched in the request's path and query; "" = any
    after_bytes: int = 0  # cut/stall: the body bytes sent first; stall_upload: the request body bytes read first
    seconds: float = 0.0  # stall, stall_upload: how long
    then: Callable[[], None] | None = None  # cut/stall: called after the first after_bytes, before the cut or the wait

    def matches(self, method: str, path: str) -> bool:
        return (self.times is None or self.times > 0) and self.method in ("", method) and re.search(self.path, path) is not None


class DroppedRequest(OSError):
    """A stall_upload fault's end: the connection is closed without an answer."""


class FaultProxy:
    def __init__(self, upstream: str, upload_bytes_per_s: float | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.upload_bytes_per_s = upload_bytes_per_s
        self.faults: list[Fault] = []
        self.injected: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()  # by method
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (clients then get refused or reset)."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)

    def schedule(self, *faults: Fault) -> None:
        with self._lock:
            self.faults = list(faults)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests[method] += 1
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    self.injected[fault.kind] += 1
                    return fault
        return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
            timeout = SOCKET_TIMEOUT_S

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self):
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
                pass

            def do_GET(self):
                try:
                    self.forward()
                except OSError:  # the client gave up (a timeout of its own) or stop() cut it
                    self.close_connection = True

            do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET  # PATCH: MLflow finalises a logged model

            def read_body(self, fault: Fault | None) -> bytes:
                reader = BodyReader(self.rfile, proxy, fault if fault is not None and fault.kind == "stall_upload" else None)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:  # the last chunk: trailers up to an empty line
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(reader.read(size + 2)[:size])
                return reader.read(int(self.headers.get("Content-Length") or 0))

            def forward(self):
                fault = proxy._take_fault(self.command, self.path)
                if fault is not None and fault.kind == "stall" and fault.after_bytes == 0:
                    proxy._stopping.wait(fault.seconds)  # before the request body: an upload stalls too
                body = self.read_body(fault)
                if proxy._stopping.is_set():
                    self.close_connection = True
                    return
                if fault is not None and fault.kind == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN_BODY)
                    return
                status, reason, headers, content = self.ask_upstream(body)
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(content)))
                self.end_headers()
                if fault is None or fault.kind == "stall" and fault.after_bytes == 0:
                    self.wfile.write(content)
                    return
                self.wfile.write(content[: fault.after_bytes])
                self.wfile.flush()
                if fault.then is not None:
                    fault.then()
                if fault.kind == "cut":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                proxy._stopping.wait(fault.seconds)
                self.wfile.write(content[fault.after_bytes:])

            def ask_upstream(self, body: bytes):
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=SOCKET_TIMEOUT_S)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in HOP_BY_HOP:
                            upstream.putheader(name, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    content = response.read() if self.command != "HEAD" else b""
                    return response.status, response.reason, response.getheaders(), content
                finally:
                    upstream.close()

        return Handler


class BodyReader:
    """Reads a request's body in pieces: at the proxy's upload rate, and for a stall_upload fault
    up to its `after_bytes`, then silent for its `seconds`, then DroppedRequest."""

    PIECE = 64 * 1024

    def __init__(self, rfile, proxy: FaultProxy, stall: Fault | None):
        self.rfile, self.proxy, self.stall = rfile, proxy, stall
        self.done = 0
        self.started = time.monotonic()

    def read(self, size: int) -> bytes:
        pieces = []
        while size > 0:
            piece = min(size, self.PIECE)
            if self.stall is not None:
                if self.done >= self.stall.after_bytes:
                    self.proxy._stopping.wait(self.stall.seconds)
                    raise DroppedRequest("stall_upload: dropped unanswered")
                piece = min(piece, self.stall.after_bytes - self.done)
            data = self.rfile.read(piece)
            if not data:
                break
            pieces.append(data)
            self.done += len(data)
            size -= len(data)
            if self.proxy.upload_bytes_per_s:  # the time these bytes take on the slow uplink
                self.proxy._stopping.wait(self.started + self.done / self.proxy.upload_bytes_per_s - time.monotonic())
        return b"".join(pieces)
