"""The coordinator's command API for the application: ``POST /commands/close``.

Headers ``x-streaming-channel`` (``scope/name``) and ``x-streaming-id`` (a publish session id, or ``*``
for every session of the channel). The live session is read from the stream's ownership record; a
``close`` command goes to its origin's agent (``streammanager.commands``), which drops the publisher;
the stream-closed event follows through the callback queue. Answers: 200 once the origin took the
command, 400 for a missing header, 401 for missing or wrong credentials when ``COMMANDS_API_AUTH`` is
set, 404 for a channel without a live session or a session that is not the live one, 503 when the
origin did not take the command within ``CLOSE_WAIT_S`` (the command is withdrawn).
"""
from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request
from kazoo.exceptions import KazooException, NoNodeError

from streammanager.commands import COMMAND_CLOSE, send_command, wait_consumed, withdraw
from streammanager.errors import BadRequest, NotFound, ServiceUnavailable, Unauthorized
from streammanager.logs import held_back
from streammanager.models import RecordError, StreamKey, StreamRecord

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 8.0
WILDCARD = "*"
MAX_HEADER_LENGTH = 300

commands_api = Blueprint("commands", __name__, url_prefix="/commands")


def _require_auth() -> None:
    auth = current_app.extensions["sm"].settings.commands_auth
    if auth is None or auth.method is None:
        return
    if not auth.accepts(request.headers.get("Authorization")):
        held = current_app.extensions["sm"].refused_command_log.allow()
        if held is not None:
            log.info("refused a command with missing or wrong credentials from %s%s", request.remote_addr,
                     held_back(held))
        raise Unauthorized(f"this command API needs {auth.method} credentials (COMMANDS_API_AUTH)", auth.method)


def _header(name: str) -> str:
    value = request.headers.get(name, "").strip()
    if not value:
        raise BadRequest(f"missing header {name}")
    if len(value) > MAX_HEADER_LENGTH:
        raise BadRequest(f"header {name} is longer than {MAX_HEADER_LENGTH} characters")
    return value


@commands_api.post("/close")
def close_stream():
    _require_auth()
    channel = _header("x-streaming-channel")
    session = _header("x-streaming-id")
    try:
        key = StreamKey.parse(channel)
    except RecordError:
        raise NotFound(f"unknown channel {channel[:80]!r} (a channel is scope/name)") from None
    svc = current_app.extensions["sm"]
    client, paths = svc.client, svc.paths
    if not client.connected:  # kazoo would queue the calls until it reconnects: the command hung, then ran
        raise ServiceUnavailable("the registry (ZooKeeper) is unreachable: the session was not closed, try again")
    try:
        data, _ = client.retry(client.get, paths.stream(key))
        owner = StreamRecord.from_json(data)
    except NoNodeError:
        raise NotFound(f"channel {channel} has no live session") from None
    except RecordError:
        raise ServiceUnavailable(f"the ownership record of {channel} is unreadable") from None
    except (KazooException, client.handler.timeout_exception):
        raise ServiceUnavailable("the registry is unreachable") from None
    if session != WILDCARD and session != owner.session_id:
        raise NotFound(f"session {session[:80]} is not a live session of channel {channel}")
    extra = {"scope": key.scope, "stream": key.name, "node_id": owner.node_id, "action": "close"}
    try:
        path = send_command(client, paths, owner.node_id, COMMAND_CLOSE, channel=channel, session=session)
        if wait_consumed(client, path, CLOSE_WAIT_S) or not withdraw(client, path):
            log.info("closed session %s", owner.session_id, extra=extra)
            return jsonify({"channel": channel, "closed": [owner.session_id], "nodeId": owner.node_id})
    except (KazooException, client.handler.timeout_exception):
        raise ServiceUnavailable("the registry is unreachable") from None
    log.warning("origin did not take the close command within %.0f s", CLOSE_WAIT_S, extra=extra)
    raise ServiceUnavailable(f"the origin of {channel} did not take the command within {CLOSE_WAIT_S:.0f} s")
