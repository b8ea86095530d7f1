"""The agent's HTTP endpoints: nginx-rtmp hooks (form-encoded) and SRS callbacks (JSON).

A malformed body is answered 400 and changes nothing. nginx-rtmp reads only the first digit of the
status (2xx allows); SRS wants HTTP 200 with a body of exactly ``0`` to allow.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import threading
from urllib.parse import parse_qsl, urlsplit

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import ClientDisconnected

from node_agent.agent import NGINX_RELAY_FLASHVER, Agent, Decision
from streammanager.logs import Throttle
from streammanager.models import RecordError, StreamKey

log = logging.getLogger(__name__)

MAX_CLIENT_ID_LENGTH = 64
MAX_REMEMBERED_CONNECTS = 4096  # SRS clients whose on_connect arguments wait for their on_publish
MAX_HOOK_BODY_BYTES = 1 << 20  # as the API server: a hook is a few hundred bytes; werkzeug buffered any body whole


class MalformedHook(ValueError):
    pass


def _client_id(raw) -> str:
    if isinstance(raw, bool) or raw is None:
        raise MalformedHook("clientid is missing")
    if not isinstance(raw, (str, int)):
        raise MalformedHook("clientid must be a string or a number")
    text = str(raw)
    if not text or len(text) > MAX_CLIENT_ID_LENGTH or not text.isprintable():
        raise MalformedHook("clientid is not a short printable value")
    return text


def _key(app, name) -> StreamKey:
    if not isinstance(app, (str, type(None))) or not isinstance(name, (str, type(None))):
        raise MalformedHook("app and stream must be strings")
    try:
        return StreamKey.validated(app, name)
    except RecordError as exc:
        raise MalformedHook(str(exc)) from None


class ConnectArgs:
    """Query arguments of each SRS client's ``tcUrl`` from its ``on_connect`` (where SRS's documented
    bodies carry the stream key), until its ``on_close``; bounded, oldest forgotten first."""

    def __init__(self, limit: int = MAX_REMEMBERED_CONNECTS):
        self._args: collections.OrderedDict[str, dict[str, str]] = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def remember(self, clientid: str, args: dict[str, str]) -> None:
        with self._lock:
            self._args[clientid] = args
            self._args.move_to_end(clientid)
            while len(self._args) > self._limit:
                self._args.popitem(last=False)

    def get(self, clientid: str) -> dict[str, str]:
        with self._lock:
            return dict(self._args.get(clientid, {}))

    def forget(self, clientid: str) -> None:
        with self._lock:
            self._args.pop(clientid, None)


def _query_args(text, what: str) -> dict[str, str]:
    if text is None:
        return {}
    if not isinstance(text, str):
        raise MalformedHook(f"{what} must be a string")
    return dict(parse_qsl(text.lstrip("?")))


def _url_query(url):
    """The query of ``url`` if it is a string (anything else is for ``_query_args`` to refuse)."""
    if not isinstance(url, str):
        return url
    try:
        return urlsplit(url).query
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise MalformedHook(f"tcUrl is not a URL: {exc}") from None


class HookCallers:
    """Who may call the hooks: the media server on this node (it connects from the loopback address or
    from one of the node's own addresses) and the networks of ``--hook-clients``. The hooks decide who
    publishes and end sessions: anyone else on the network could otherwise unpublish any stream, name
    any file as a session's recording, or fill the node's capacity with players that do not exist."""

    REFUSAL_LOG_EVERY_S = 10.0

    def __init__(self, settings):
        own = {"127.0.0.1", "::1", settings.host, settings.http_host}
        self._addresses = {ipaddress.ip_address(a) for a in own if a}
        self._networks = tuple(ipaddress.ip_network(n) for n in settings.hook_clients)
        self._refusals = Throttle(self.REFUSAL_LOG_EVERY_S)

    def refused(self) -> int | None:
        """Count a refusal; the number of refusals not logged since the last one that was, when this one
        is to be logged (None: not)."""
        return self._refusals.allow()

    def allows(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        if getattr(address, "ipv4_mapped", None) is not None:
            address = address.ipv4_mapped
        return address in self._addresses or any(address in network for network in self._networks)


def create_hooks_app(agent: Agent) -> Flask:
    app = Flask("node_agent")
    app.config["MAX_CONTENT_LENGTH"] = MAX_HOOK_BODY_BYTES
    connects = ConnectArgs()
    callers = HookCallers(agent.settings)

    @app.errorhandler(MalformedHook)
    def malformed(exc: MalformedHook):
        agent.metrics.hooks.labels("unknown", "malformed").inc()
        log.warning("refused a malformed hook on %s: %s", request.path, exc,
                    extra={"node_id": agent.settings.node_id})
        return Response(f"malformed hook: {exc}\n", status=400, mimetype="text/plain")

    @app.errorhandler(404)
    def not_found(exc):
        return Response("no such endpoint\n", status=404, mimetype="text/plain")

    @app.errorhandler(405)
    def not_allowed(exc):
        return Response("method not allowed\n", status=405, mimetype="text/plain")

    @app.errorhandler(413)
    def too_large(exc):
        return Response(f"a hook body is at most {MAX_HOOK_BODY_BYTES} bytes\n", status=413, mimetype="text/plain")

    @app.before_request
    def only_our_media_server():
        if request.path.startswith("/hooks/") and not callers.allows(request.remote_addr):
            suppressed = callers.refused()
            if suppressed is not None:  # at most once per REFUSAL_LOG_EVERY_S: a flood of forged hooks
                log.warning("refused a hook from %s: not this node's media server (see --hook-clients); "
                            "%d more refused since the last such line", request.remote_addr, suppressed,
                            extra={"node_id": agent.settings.node_id})
            return Response("hooks are answered for this node's media server only\n", status=403,
                            mimetype="text/plain")
        return None

    @app.before_request
    def read_body():
        # read the whole body first: a broken chunked framing or a client gone mid-body raises OSError
        # from the parsers below, which was a 500 with an HTML page (and a traceback in the log)
        try:
            request.get_data(cache=True)
        except (OSError, ValueError, ClientDisconnected) as exc:
            raise MalformedHook(f"the request body could not be read: {exc}") from None

    @app.post("/hooks/nginx")
    def nginx_hook():
        if request.mimetype != "application/x-www-form-urlencoded":
            raise MalformedHook("expected an application/x-www-form-urlencoded body")
        form = request.form
        call = form.get("call")
        if call not in NGINX_CALLS:
            raise MalformedHook(f"unknown call {str(call)[:40]!r}")
        if call in ("connect", "update_publish", "update_play"):
            agent.metrics.hooks.labels(call, "allowed").inc()
            return _nginx_answer(Decision.allow())
        app_name = form.get("app")
        if not app_name and form.get("flashver") == NGINX_RELAY_FLASHVER:
            # nginx-rtmp's own pull reports an empty app; its addr is the URL it pulls: host:port/app/name
            parts = form.get("addr", "").split("?", 1)[0].split("/")
            app_name = parts[-2] if len(parts) >= 3 else app_name
        key = _key(app_name, form.get("name"))
        clientid = _client_id(form.get("clientid"))
        args = {k: v for k, v in form.items()}
        relay = form.get("flashver", "") == NGINX_RELAY_FLASHVER or "relay" in args
        return _nginx_answer(dispatch(agent, call, key, clientid, args, relay))

    @app.post("/hooks/srs")
    def srs_hook():
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # nested deeper than the JSON parser goes
            body = None
        if not isinstance(body, dict):
            raise MalformedHook("expected a JSON object")
        action = body.get("action")
        if action not in SRS_ACTIONS:
            raise MalformedHook(f"unknown action {str(action)[:40]!r}")
        tc_args = _query_args(_url_query(body.get("tcUrl")), "tcUrl")
        if action == "on_connect":
            # the key may be only here (tcUrl): remember it for this client's on_publish
            if body.get("client_id") is not None and tc_args:
                connects.remember(_client_id(body.get("client_id")), tc_args)
            agent.metrics.hooks.labels("connect", "allowed").inc()
            return _srs_answer(Decision.allow())
        clientid = _client_id(body.get("client_id"))
        if action == "on_close":
            # on_close has no stream: the client leaves whatever it held
            connects.forget(clientid)
            for key in agent_streams_of(agent):
                agent.on_done(key, clientid)
            agent.metrics.hooks.labels("done", "allowed").inc()
            return _srs_answer(Decision.allow())
        key = _key(body.get("app"), body.get("stream"))
        ip = body.get("ip") or ""
        if not isinstance(ip, str):
            raise MalformedHook("ip must be a string")
        # the stream key: in param (current SRS), else in tcUrl, else in the client's on_connect tcUrl
        args = {**connects.get(clientid), **tc_args, **_query_args(body.get("param"), "param"), "addr": ip}
        relay = "relay" in args
        return _srs_answer(dispatch(agent, SRS_ACTIONS[action], key, clientid, args, relay))

    @app.get("/healthz")
    def healthz():
        """200 once the node is registered (hooks are served from the start: nginx calls them early).
        ``status`` is ``ok`` while the node's record is its current session's, ``degraded`` while the agent
        is cut off from ZooKeeper (past the session timeout the node has left every answer) or is
        registering again on a new session, ``starting`` (503) before its first registration."""
        registered = agent.registered.is_set()
        connected = agent.client.connected
        status = "starting"
        if registered:
            status = "ok" if connected and agent.registered_on_current_session() else "degraded"
        body = {"status": status, "nodeId": agent.settings.node_id, "role": agent.settings.role,
                "zookeeper": "connected" if connected else "disconnected"}
        return jsonify(body), (200 if registered else 503)

    @app.get("/metrics")
    def metrics():
        # content_type, not mimetype: Flask would add a second charset parameter (Prometheus 3 refuses it)
        return Response(generate_latest(agent.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    return app


NGINX_CALLS = ("connect", "publish", "play", "publish_done", "play_done", "done", "update_publish",
               "update_play", "record_done")
SRS_ACTIONS = {"on_connect": "connect", "on_close": "done", "on_publish": "publish",
               "on_unpublish": "publish_done", "on_play": "play", "on_stop": "play_done"}


def dispatch(agent: Agent, call: str, key: StreamKey, clientid: str, args: dict[str, str],
             relay: bool) -> Decision:
    decision = _decide(agent, call, key, clientid, args, relay)
    agent.metrics.hooks.labels(call, "allowed" if decision.allowed else "refused").inc()
    return decision


def _decide(agent: Agent, call: str, key: StreamKey, clientid: str, args: dict[str, str],
            relay: bool) -> Decision:
    log.debug("hook %s client %s%s", call, clientid, " (relay)" if relay else "",
              extra={"node_id": agent.settings.node_id, "scope": key.scope, "stream": key.name})
    if call == "publish":
        return agent.on_publish(key, clientid, args)
    if call == "play":
        return agent.on_play(key, clientid, relay and agent.is_edge_pull(args))
    if call == "publish_done":
        agent.on_publish_done(key, clientid)
    elif call == "play_done":
        agent.on_play_done(key, clientid)
    elif call == "done":
        agent.on_done(key, clientid)
    elif call == "record_done":
        agent.on_record_done(key, clientid, args.get("path", ""))
    return Decision.allow()


def agent_streams_of(agent: Agent) -> list[StreamKey]:
    return [StreamKey.parse(k) for k in agent.table.loads()]


def _nginx_answer(decision: Decision) -> Response:
    response = Response(decision.message + "\n", status=decision.status, mimetype="text/plain")
    if decision.location:
        response.headers["Location"] = decision.location
    return response


def _srs_answer(decision: Decision) -> Response:
    if decision.allowed:
        return Response("0", status=200, mimetype="text/plain")
    return Response(str(decision.status), status=decision.status, mimetype="text/plain")
