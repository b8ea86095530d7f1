"""The API server's front: an ASGI app on gunicorn's asyncio worker.

Lookups and ``/healthz`` are answered on the event loop itself, from the registry view in memory, by
the same functions as the Flask routes (:func:`~streammanager.api.answer_lookup`,
:func:`~streammanager.api.health`). Everything else (admin, stats, listings, metrics, the dashboard,
the coordinator's routes) goes to the Flask app on a small thread pool (a2wsgi).

Why not gthread workers: a lookup is tens of microseconds of CPU, but a gthread worker spent ~400 us of its own per
request (handing each connection between its poller and its thread pool, waking the poller through a
pipe, re-registering the socket), so at 50 keep-alive connections a worker was mostly busy with that,
and the latency tail followed (README, Benchmarks). One event loop per worker serves the same
connections without those hand-offs.

A broadcast lookup for a stream that is not live yet writes its reservation to ZooKeeper (up to a
second when ZooKeeper is slow): broadcast lookups run on a thread pool of their own, so that the loop
never waits. A query string of raw non-ASCII bytes gets a 400 here (a2wsgi cannot decode it).
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import orjson
from a2wsgi import WSGIMiddleware
from flask import Flask

from streammanager.api import LOOKUP_PATH, RESERVED_SCOPES, Services, answer_lookup, error_body, health, query_args

log = logging.getLogger(__name__)

JSON_HEADERS = ((b"content-type", b"application/json"),)


class ApiFront:
    """ASGI application: lookups and health on the loop, the rest through Flask (``threads`` threads)."""

    def __init__(self, app: Flask, threads: int = 2):
        self.app = app
        self.svc: Services = app.extensions["sm"]
        self._wsgi = WSGIMiddleware(app.wsgi_app, workers=threads)  # Flask's routes, on their own threads
        # broadcast lookups apart: a slow listing on every Flask thread never holds back a publisher
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sm-broadcast")
        # the coordinator's commands apart too: a close waits up to 8 s for its origin, and closes of a
        # stuck origin held every Flask thread (admin calls, /stats, listings waited behind them)
        self._commands = WSGIMiddleware(app.wsgi_app, workers=threads)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "http" and not scope.get("query_string", b"").isascii():
            # HTTP clients percent-encode; a2wsgi (and WSGI) would fail on raw bytes with a 500
            await _respond(send, 400, error_body("the query string holds raw non-ASCII bytes: percent-encode them"))
            return
        if kind == "http" and scope["method"] == "GET":
            path = scope["path"]
            match = LOOKUP_PATH.match(path)
            if match is not None and match.group(1) not in RESERVED_SCOPES:
                try:
                    status, body = await self._lookup(match.group(1), match.group(2), scope)
                except Exception:  # never a traceback to the client: the app's handler answers it
                    log.exception("fast lookup failed; answering through the app")
                else:
                    await _respond(send, status, body)
                    return
            elif path == "/healthz":
                status, doc = health(self.svc.view)
                await _respond(send, status, orjson.dumps(doc))
                return
        declared = _declared_length(scope) if kind == "http" else 0
        if declared:
            # Read the body here, on the loop, before a Flask thread takes the request: a client sending
            # its body slowly held one of the worker's few Flask threads as long as gunicorn waits for
            # body bytes (its 30 s timeout), and two such clients held every route Flask answers.
            try:
                if declared > MAX_BODY_BYTES:  # refused before a byte of it is read
                    raise _BodyTooLarge()
                receive = await _buffered_body(receive)
            except asyncio.TimeoutError:
                await _respond(send, 408, error_body(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s"),
                               close=True)
                return
            except _BodyTooLarge:  # the rest of the body is not read: the connection cannot carry another request
                await _respond(send, 413, error_body(f"the request body is larger than {MAX_BODY_BYTES} bytes"),
                               close=True)
                return
            if receive is None:  # the client went away
                return
            receive, length = receive
            # a chunked body now has a length: WSGI (a2wsgi, werkzeug) reads no body without one, and a
            # chunked node group document was answered "the body must be JSON"
            headers = [(n, v) for n, v in scope["headers"] if n not in (b"transfer-encoding", b"content-length")]
            scope = {**scope, "headers": headers + [(b"content-length", str(length).encode())]}
        if kind == "http" and scope["path"].startswith("/commands/"):
            await self._commands(scope, receive, send)
            return
        await self._wsgi(scope, receive, send)

    async def _lookup(self, scope_name: str, stream: str, scope) -> tuple[int, bytes]:
        args = query_args(scope.get("query_string", b"").decode("latin-1"))
        action = args.get("action")
        call = (self.svc, scope_name, stream, action, args.get("region"), args.get("strict"))
        if action == "broadcast":  # may write a reservation to ZooKeeper: not on the loop
            return await asyncio.get_running_loop().run_in_executor(self._pool, answer_lookup, *call)
        return answer_lookup(*call)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # close the ZooKeeper session now, not at its timeout (its reservations stay until they expire)
                await asyncio.get_running_loop().run_in_executor(None, self.svc.close)
                self._pool.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return


MAX_BODY_BYTES = 1 << 20  # a node group document is a few kilobytes
BODY_TIMEOUT_S = 10.0


class _BodyTooLarge(Exception):
    pass


def _declared_length(scope) -> int:
    """The body's Content-Length; -1 for a chunked body (its length is known once read); 0: no body."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return -1
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # gunicorn refuses a bad Content-Length before the app sees the request
    return 0


async def _buffered_body(receive):
    """Receive the whole request body (bounded in size and time); return a ``receive`` that replays it
    and the body's length, or None if the client disconnected."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_TIMEOUT_S
    chunks, size = [], 0
    while True:
        message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay, len(body)


async def _respond(send, status: int, body: bytes, close: bool = False) -> None:
    headers = JSON_HEADERS + ((b"content-length", str(len(body)).encode()),)
    if close:  # say so: the server closes the connection after this answer
        headers += ((b"connection", b"close"),)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
