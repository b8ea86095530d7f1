"""A real HTTP receiver of our own for the coordinator tests: the application's key verification and
event endpoints. Binds 127.0.0.1 on a free port, records every request, answers as told."""
from __future__ import annotations

import base64
import http.server
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.conftest import wait_until


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what we answered (0: we did not answer in time)

    def __getitem__(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Receiver:
    """``answer(request_headers) -> status``; by default 200. ``delay_s`` holds every answer; ``trickle_s``
    sends it a byte at a time over that long (each byte well within a per-read timeout)."""

    answer: Callable[[dict[str, str]], int] = lambda headers: 200
    delay_s: float = 0.0
    trickle_s: float = 0.0
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver.answer(headers)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                receiver._record(Received("POST", self.path, headers, body, status))
                if receiver.trickle_s:
                    raw = f"HTTP/1.1 {status} Answer\r\nContent-Length: 0\r\n\r\n".encode()
                    for n in range(len(raw)):
                        self.wfile.write(raw[n:n + 1])
                        time.sleep(receiver.trickle_s / len(raw))
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="receiver", daemon=True)
        self.thread.start()

    def _record(self, item: Received) -> None:
        with self._lock:
            self.received.append(item)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def accepted(self) -> list[Received]:
        return [r for r in self.requests() if r.status == 200]

    def wait_for(self, count: int, timeout_s: float = 10.0, accepted_only: bool = True) -> list[Received]:
        pick = self.accepted if accepted_only else self.requests
        wait_until(lambda: len(pick()) >= count, timeout_s, what=f"{count} requests at the receiver")
        return pick()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def fails_then_accepts(failures: int, status: int = 500) -> Callable[[dict[str, str]], int]:
    """An answer policy: ``failures`` errors first, then 200 for ever."""
    count = {"n": 0}
    lock = threading.Lock()

    def answer(headers: dict[str, str]) -> int:
        with lock:
            count["n"] += 1
            return status if count["n"] <= failures else 200
    return answer


def event_tuple(r: Received) -> tuple:
    """(type, stream type, session) of a received event: what order assertions compare."""
    return (r["x-event-type"], r["x-stream-type"], r["x-streaming-id"])


@pytest.fixture
def receiver():
    """Our own HTTP receiver on 127.0.0.1, stopped after the test."""
    server = Receiver()
    yield server
    server.close()
