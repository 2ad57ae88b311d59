"""A hostile image host on loopback: slow bodies, oversized bodies, wrong types, for the remote URL cases.

It runs in the test process on ``127.0.0.1`` (a thread per connection) and is reached only by the
Serve replicas of the same machine. Nothing here talks to any other address.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.api.helpers import encode, random_image

#: Seconds between two bytes of /slow.png (its whole body would take minutes).
SLOW_BYTE_INTERVAL_S = 0.25
#: Longest a slow response keeps its connection open.
SLOW_RESPONSE_MAX_S = 8.0


@dataclass
class ImageHost:
    """The running server: its base URL and what it served."""

    base_url: str
    port: int
    hits: dict[str, int]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(hits: dict[str, int], oversized_bytes: int):
    png = encode(random_image(71), "PNG")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        def _headers(self, status: int, content_type: str, length: int | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if length is None:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(length))
            self.send_header("Connection", "close")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            hits[path] = hits.get(path, 0) + 1
            try:
                if path == "/good.png":
                    self._headers(200, "image/png", len(png))
                    self.wfile.write(png)
                elif path == "/slow.png":
                    # Headers at once, then one byte at a time: only a total deadline stops this.
                    self._headers(200, "image/png", None)
                    started = time.monotonic()
                    for byte in png:
                        if time.monotonic() - started > SLOW_RESPONSE_MAX_S:
                            break
                        self._chunk(bytes([byte]))
                        time.sleep(SLOW_BYTE_INTERVAL_S)
                elif path == "/declared-huge.png":
                    # Content-Length over any limit, with a small body: refused from the header.
                    self._headers(200, "image/png", oversized_bytes)
                    self.wfile.write(png[:1024])
                elif path == "/endless.png":
                    # No Content-Length: refused while streaming in, once past the limit.
                    self._headers(200, "image/png", None)
                    block = b"\x00" * 16384
                    for _ in range(max(1, oversized_bytes // len(block))):
                        self._chunk(block)
                    self._chunk(b"")
                elif path == "/page.html":
                    body = b"<html>not an image</html>"
                    self._headers(200, "text/html", len(body))
                    self.wfile.write(body)
                else:
                    body = b"missing"
                    self._headers(404, "text/plain", len(body))
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the fetcher gave up: expected
                pass

    return Handler


@contextmanager
def image_host(oversized_bytes: int = 4 * 1024 * 1024) -> Iterator[ImageHost]:
    """Serve the hostile image routes on ``127.0.0.1`` for the duration of the block."""
    hits: dict[str, int] = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hits, oversized_bytes))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="image-host", daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        yield ImageHost(base_url=f"http://127.0.0.1:{port}", port=port, hits=hits)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
