"""The ASGI front reads a request body on the loop before Flask gets it: a slow body holds no Flask thread,
and a chunked body reaches Flask whole. No server or ZooKeeper needed: the front is driven directly."""
import asyncio
import types

from flask import Flask, request

from streammanager import front as front_module
from streammanager.front import ApiFront


def make_front():
    app = Flask("t")

    @app.post("/echo")
    def echo():
        return {"length": len(request.get_data())}

    @app.get("/ping")
    def ping():
        return {"ok": True}

    app.extensions["sm"] = types.SimpleNamespace(view=None)
    return ApiFront(app, threads=1)  # one Flask thread: a request holding it would hold every route


def http_scope(method, path, headers):
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("t", 80),
            "client": ("c", 1), "root_path": ""}


async def call(front, scope, messages, stall=False):
    queue = list(messages)
    sent = []

    async def receive():
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(3600)  # the rest of the body never comes
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await front(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_slow_body_holds_no_flask_thread_and_is_answered_408(monkeypatch):
    monkeypatch.setattr(front_module, "BODY_TIMEOUT_S", 0.3, raising=False)
    front = make_front()

    async def scenario():
        slow = asyncio.ensure_future(call(front, http_scope("POST", "/echo", [(b"content-length", b"100")]),
                                          [{"type": "http.request", "body": b"{", "more_body": True}], stall=True))
        await asyncio.sleep(0.1)
        # the one Flask thread is free for other routes meanwhile
        assert (await asyncio.wait_for(call(front, http_scope("GET", "/ping", []), []), 2))[0] == 200
        status, body = await asyncio.wait_for(slow, 5)
        assert status == 408 and b"errorMessage" in body

    asyncio.run(scenario())


def test_a_chunked_body_reaches_flask_whole():
    front = make_front()
    messages = [{"type": "http.request", "body": b"hello ", "more_body": True},
                {"type": "http.request", "body": b"world", "more_body": False}]
    status, body = asyncio.run(asyncio.wait_for(
        call(front, http_scope("POST", "/echo", [(b"transfer-encoding", b"chunked")]), messages), 5))
    assert status == 200 and b'"length":11' in body.replace(b" ", b"")
