"""HTTP calls with a deadline for the whole request, not for each socket read.

requests' (and urllib3's) ``timeout`` bounds each connect and each read of the socket: an endpoint that
trickles its answer out a byte at a time, each within the timeout, is waited for as long as it likes. A
key verification endpoint that trickled its 200 out over 8 s allowed the publisher, with a timeout of
2.5 s (nginx had long given up on its publish hook by then); an event callback endpoint could hold a
delivery thread for minutes.

:func:`post_within` makes the request on a session whose connections register their socket with the
calling thread's deadline; a timer shuts the socket down when the deadline passes, which ends whatever
read is under way, and the call raises :class:`DeadlineExceeded` (a ``requests.Timeout``). The body is
read inside the deadline too.
"""
from __future__ import annotations

import socket
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_local = threading.local()  # the deadline of the request this thread is making, if any


class DeadlineExceeded(requests.Timeout):
    """The whole request took longer than its deadline."""


class _Deadline:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked on it returns at once
    except OSError:
        pass  # closed already


class _Watched:
    """A connection that puts its socket under the calling thread's deadline before each answer."""

    def getresponse(self, *args, **kwargs):
        deadline = getattr(_local, "deadline", None)
        if deadline is not None:
            deadline.watch(self.sock)  # a kept-alive connection was connected before this request
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, *args, **kwargs):
        manager = super().proxy_manager_for(*args, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


def watched_session() -> requests.Session:
    """A requests session for :func:`post_within` (its connections are kept alive between calls)."""
    made = requests.Session()
    adapter = _WatchedAdapter()
    made.mount("http://", adapter)
    made.mount("https://", adapter)
    return made


def post_within(http: requests.Session, url: str, deadline_s: float, **kwargs) -> requests.Response:
    """``http.post(url, **kwargs)``, the answer's body read, all within ``deadline_s`` (``http`` made by
    :func:`watched_session`). Raises DeadlineExceeded when the deadline passes first, or requests' own errors."""
    deadline = _Deadline()
    timer = threading.Timer(deadline_s, deadline.expire)
    timer.daemon = True
    previous = getattr(_local, "deadline", None)
    _local.deadline = deadline
    timer.start()
    try:
        response = http.post(url, timeout=deadline_s, **kwargs)
        response.content  # noqa: B018 (read here, inside the deadline)
    except (requests.RequestException, OSError) as exc:
        if deadline.expired:
            raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s") from None
        if isinstance(exc, requests.RequestException):
            raise
        raise requests.ConnectionError(str(exc)) from None
    finally:
        timer.cancel()
        _local.deadline = previous
    if deadline.expired:  # the answer was complete just as the timer fired: it is late all the same
        raise DeadlineExceeded(f"no complete answer within {deadline_s:g} s")
    return response
