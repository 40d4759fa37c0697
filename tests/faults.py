"""A network that fails as real ones do, in front of the test S3 endpoint: an HTTP proxy on 127.0.0.1 that cuts
chosen video GETs mid-body, answers 503 SlowDown, or resets the connection, and can take the videos down."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

CUT, SLOWDOWN, RESET = "cut", "slowdown", "reset"
FAULTS = (CUT, SLOWDOWN, RESET)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """Forwards every request to `upstream`. A GET of an object whose key ends with one of `suffixes` is a video
    GET: the n-th GET of each video key (n from 0) gets `faults[n]` if there is one, and passes after that;
    `faults` may also be a function of the key's number (in order of first GET) giving that key's faults. With
    `down` set every video GET is reset. `injected` counts the faults by kind, `gets` the GETs per key.
    `drop_headers`: request headers left out on the way (e.g. If-None-Match, as a store without conditional writes)."""

    def __init__(
        self,
        upstream: str,
        faults: tuple[str, ...] | Callable[[int], tuple[str, ...]] = (),
        suffixes: tuple[str, ...] = (".mp4",),
        drop_headers: tuple[str, ...] = (),
    ):
        self.upstream = urlparse(upstream)
        self.drop_headers = {h.lower() for h in drop_headers}
        self.faults, self.suffixes = faults, suffixes
        self.keys: dict[str, tuple[str, ...]] = {}  # video key -> its faults
        self.down = False
        self.injected: Counter = Counter()
        self.gets: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to pass it."""
        key = urlparse(path).path
        if method != "GET" or not key.endswith(self.suffixes):
            return None
        with self._lock:
            if key not in self.keys:
                self.keys[key] = self.faults(len(self.keys)) if callable(self.faults) else self.faults
            n = self.gets[key]
            self.gets[key] += 1
            faults = self.keys[key]
            fault = RESET if self.down else (faults[n] if n < len(faults) else None)
            if fault:
                self.injected[fault] += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet: the tests read `injected`, not a log
        pass

    def do_GET(self):
        self._forward()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _forward(self) -> None:
        body = self._request_body()
        fault = self.owner.decide(self.command, self.path)
        if fault == RESET:
            # SO_LINGER 0: close() sends RST, the peer sees "connection reset", not a clean end
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == SLOWDOWN:
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN_BODY)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN_BODY)
            return
        up = http.client.HTTPConnection(self.owner.upstream.hostname, self.owner.upstream.port, timeout=60)
        try:
            dropped = _HOP_BY_HOP | self.owner.drop_headers
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            up.request(self.command, self.path, body=body, headers=headers)
            response = up.getresponse()
            data = response.read()
        finally:
            up.close()
        self.send_response(response.status, response.reason)
        head = self.command == "HEAD"  # its Content-Length is the object's, with no body to count
        for k, v in response.getheaders():
            if k.lower() not in _HOP_BY_HOP and (head or k.lower() != "content-length"):
                self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if head:
            return
        if fault == CUT:  # the headers promise every byte; half arrive, then the connection ends
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    def _request_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", 0) or 0)
        return self.rfile.read(length) if length else None
