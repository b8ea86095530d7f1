"""The HTTP API: Red5 Pro Stream Manager 2.0 routes (``1.0`` as an alias), admin reads, health, metrics.

``create_app`` is the application factory. Every error is answered by one handler in the documented
shape ``{"errorMessage": "...", "timestamp": <ms>}``.
"""
from __future__ import annotations

import hmac
import logging
import re
import threading
import time
import weakref
from urllib.parse import parse_qsl

import orjson

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from kazoo.exceptions import KazooException
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from streammanager.commands_api import commands_api
from streammanager.config import ServerSettings
from streammanager.errors import ApiError, BadRequest, Forbidden, NoCapacity, NotFound, ServiceUnavailable, Unauthorized
from streammanager.logs import Throttle, held_back
from streammanager.lookupstats import LookupStats
from streammanager.models import NodeRecord, RecordError, StreamKey, validate_name
from streammanager.placement import Housekeeper, Placement
from streammanager.registry import (
    LiveStream,
    RegistryView,
    ZkPaths,
    delete_children_twice_deep,
    make_client,
    now_ms,
)

log = logging.getLogger(__name__)

API_PREFIX = '/streammanager/api/<any("2.0","1.0"):version>'
RESERVED_SCOPES = ("list",)
# what the server's front (streammanager.front) answers itself, without Flask's routing
LOOKUP_PATH = re.compile(r"^/streammanager/api/(?:2\.0|1\.0)/event/([^/]+)/([^/]+)$")
MAX_REGION_LENGTH = 64
ADMIN_ZK_TIMEOUT_S = 10.0  # an admin call that writes to ZooKeeper answers 503 after this, not never

LOOKUPS = Counter("sm_lookups_total", "Broadcast and subscribe lookups", ["action", "outcome"])
# A subscribe lookup is answered from memory in tens of microseconds, a broadcast that reserves a new
# stream's origin waits for a ZooKeeper write (milliseconds; its timeout is 1 s): with 0.5 ms as the first
# bound, nearly every subscribe lookup fell in it and a lookup ten times slower did not show.
LOOKUP_SECONDS = Histogram("sm_lookup_seconds", "Time to answer a lookup", ["action"],
                           buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1, 0.25, 0.5, 1.0, 2.5))
# "livemax": the largest value among the workers alive now. ("max" kept the files of dead workers: a
# worker that was restarted went on reporting its last value for the life of the server.) Every worker
# refreshes its own values each second (refresh_view_metrics, run by its housekeeper), not only when it
# happens to answer a scrape: a scraper's keep-alive connection reaches one worker, and the others' values
# were whatever they were at their last scrape.
VIEW_NODES = Gauge("sm_view_nodes", "Nodes in this worker's registry view", multiprocess_mode="livemax")
VIEW_STREAMS = Gauge("sm_view_live_streams", "Live streams in this worker's registry view",
                     multiprocess_mode="livemax")
VIEW_DECODE_ERRORS = Gauge("sm_view_decode_errors", "Node records this worker dropped as undecodable",
                           multiprocess_mode="livemax")
VIEW_AGE = Gauge("sm_view_age_seconds", "Age of this worker's registry view (0 while connected)",
                 multiprocess_mode="livemax")
# Registry churn is what costs a worker most at scale (README, Benchmarks): its rate next to the lookup
# latency says when to add API servers. Each worker applies every change, so the sum counts a change once
# per worker.
VIEW_CHANGES = Counter("sm_view_changes", "Node record changes applied to the registry views (once per worker, "
                       "from its first load on)")
_changes_counted: "weakref.WeakKeyDictionary[RegistryView, int]" = weakref.WeakKeyDictionary()
_changes_lock = threading.Lock()

LOOKUP_ACTIONS = ("broadcast", "subscribe")
# every series exists from the start (zero until a lookup of its kind); lookups add to them in batches
for _action in LOOKUP_ACTIONS:
    # no_capacity: answered 400 like a bad request, but no node could take it (full, drained, none in a
    # strict region): the operator's problem, not the client's, so not counted among bad requests
    for _outcome in ("ok", "bad_request", "no_capacity", "not_found", "error"):
        LOOKUPS.labels(_action, _outcome)
LOOKUP_STATS = LookupStats(LOOKUPS, LOOKUP_SECONDS, LOOKUP_ACTIONS)

api = Blueprint("api", __name__, url_prefix=API_PREFIX)
ops = Blueprint("ops", __name__)


class ListingCache:
    """The stream listings (``/event/list`` and ``/event/list/stats``) and the dashboard's page, built and
    serialised once and shared while the view has not changed, or for ``ttl_s`` after a change.

    At 100 000 live streams a listing is about a second of a worker's CPU, holding the GIL from the
    lookups, and the dashboard at 1000 nodes up to two; without sharing, one client polling them would
    stall every lookup on the worker. The price is a listing up to ``ttl_s`` old (the per-stream
    ``/stats`` is never cached).
    """

    KINDS = ("list", "stats", "dashboard")
    # pages that show more than the view's content (the connection's state, the view's age, report ages,
    # the time): shared for ``ttl_s`` only, never for as long as the view has no change (an outage
    # brings none: the dashboard said "connected" all through one)
    TIMED = frozenset({"dashboard"})

    def __init__(self, ttl_s: float = 1.0):
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, int, bytes]] = {}  # kind -> (built at, view changes, body)
        self._locks = {kind: threading.Lock() for kind in self.KINDS}

    def get(self, kind: str, view: RegistryView, build) -> bytes:
        with self._locks[kind]:  # callers arriving during a build wait for it instead of building again
            entry = self._entries.get(kind)
            now, changes = time.monotonic(), view.changes
            unchanged = entry is not None and entry[1] == changes and kind not in self.TIMED
            if entry is not None and (unchanged or now - entry[0] < self._ttl_s):
                return entry[2]
            body = build()
            self._entries[kind] = (now, changes, body)
            return body


class Services:
    """What the routes need, built once per process by the factory."""

    def __init__(self, settings: ServerSettings, client, view: RegistryView, placement: Placement,
                 paths: ZkPaths, housekeeper: Housekeeper | None):
        self.settings = settings
        self.client = client
        self.view = view
        self.placement = placement
        self.paths = paths
        self.housekeeper = housekeeper
        self.listings = ListingCache()
        # refused credentials are logged at most every 10 s each: any client can make them at any rate
        self.wrong_token_log = Throttle()
        self.refused_command_log = Throttle()

    def close(self) -> None:
        if self.housekeeper is not None:
            self.housekeeper.stop()
        LOOKUP_STATS.flush()
        self.view.close()
        self.client.stop()
        self.client.close()


def create_app(settings: ServerSettings, *, init_timeout_s: float = 30.0) -> Flask:
    """Build the app: connect to ZooKeeper and load the registry view (waiting up to
    ``init_timeout_s``; the client keeps reconnecting in the background after that)."""
    paths = ZkPaths(settings.zk_root)
    client = make_client(settings.zk_hosts, settings.zk_timeout_s, settings.zk_auth)
    view = RegistryView(client, paths, feed_socket=settings.feed_socket)
    view.start()
    if not view.wait_initialized(init_timeout_s):
        log.warning("registry view not loaded after %.0f s (ZooKeeper %s): lookups answer 503 until it is",
                    init_timeout_s, settings.zk_hosts)
    placement = Placement(
        view, client, paths,
        heartbeat_max_age_s=settings.heartbeat_max_age_s,
        reservation_ttl_s=settings.reservation_ttl_s,
        assignment_ttl_s=settings.assignment_ttl_s,
        best_few=settings.best_few,
    )
    housekeeper = Housekeeper(placement, also=(LOOKUP_STATS.flush, lambda: refresh_view_metrics(view)))
    housekeeper.start()

    app = Flask("streammanager")
    app.json.sort_keys = False
    # No 308 redirects that merge slashes: ".../event/live//stats" would become a lookup of the stream
    # "stats"; an empty name is a 400 (see _http_error)
    app.url_map.merge_slashes = False
    app.extensions["sm"] = Services(settings, client, view, placement, paths, housekeeper)
    from streammanager.admin_groups import admin_groups
    from streammanager.dashboard import dashboard

    app.register_blueprint(api)
    app.register_blueprint(admin_groups)
    app.register_blueprint(dashboard)  # GET /dashboard: the cluster at a glance
    app.register_blueprint(ops)
    app.register_blueprint(commands_api)  # POST /commands/close (the coordinator API)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def services() -> Services:
    return current_app.extensions["sm"]


# -- errors -----------------------------------------------------------------------------------------
def error_response(status: int, message: str) -> Response:
    response = jsonify({"errorMessage": message, "timestamp": now_ms()})
    response.status_code = status
    return response


def _api_error(exc: ApiError) -> Response:
    response = error_response(exc.status, exc.message)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = exc.challenge
    return response


EVENT_PATH = re.compile(r"^/streammanager/api/(?:2\.0|1\.0)/event/")


def _http_error(exc: HTTPException) -> Response:
    if exc.code == 404 and request.method in ("GET", "HEAD") and EVENT_PATH.match(request.path):
        # every well-formed /event/... path has a route: what is left has an empty scope or name
        return error_response(400, "scope and stream names cannot be empty: use "
                                   f".../event/<scope>/<stream> (got {request.path[:200]})")
    if exc.code == 404:
        return error_response(404, f"no such resource: {request.method} {request.path[:200]}")
    if exc.code == 405:
        response = error_response(405, f"method {request.method} is not allowed on {request.path[:200]}")
        allowed = getattr(exc, "valid_methods", None)
        if allowed:  # RFC 9110 section 15.5.6: a 405 names the methods the resource takes
            response.headers["Allow"] = ", ".join(allowed)
        return response
    return error_response(exc.code or 400, exc.description or exc.name)


def _unexpected_error(exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "internal error; see the server log")


# -- request helpers --------------------------------------------------------------------------------
def stream_key(scope: str, stream: str) -> StreamKey:
    try:
        key = StreamKey.validated(scope, stream)
    except RecordError as exc:
        raise BadRequest(str(exc)) from None
    if key.scope in RESERVED_SCOPES:
        raise BadRequest(f"scope name {key.scope!r} is reserved")
    return key


def parse_region(region: str | None) -> str | None:
    if region is None or region == "":
        return None
    if len(region) > MAX_REGION_LENGTH:
        raise BadRequest(f"region is longer than {MAX_REGION_LENGTH} characters")
    return region


def parse_strict(raw: str | None) -> bool:
    if raw is None:
        return False
    raw = raw.strip().lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no", ""):
        return False
    raise BadRequest("strict must be true or false")


def require_admin() -> None:
    expected = services().settings.access_token
    if not expected:
        raise Forbidden("the admin API is disabled: set SM_ACCESS_TOKEN on the stream manager")
    given = request.args.get("accessToken")
    if not given:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110)
            given = credentials.strip()
    if not given:
        raise Unauthorized("missing accessToken")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        # who tried, never what they gave: a guessing client shows in the log (the commands API logs its own)
        held = services().wrong_token_log.allow()
        if held is not None:
            log.warning("refused an admin call with a wrong access token: %s %s from %s%s", request.method,
                        request.path[:120], request.remote_addr, held_back(held))
        raise Unauthorized("invalid accessToken")


def require_view() -> None:
    if not services().view.initialized:
        raise ServiceUnavailable("the registry view is not loaded yet (ZooKeeper unreachable?)")


def listing_json(stream: LiveStream) -> dict:
    return {
        "name": stream.key.name,
        "scope": stream.key.scope_path,
        "serverAddress": stream.origin.host,
        "region": stream.origin.region,
    }


def stats_json(stream: LiveStream) -> dict:
    return {**listing_json(stream), "currentSubscribers": stream.subscribers, "startTime": stream.start_ms}


def node_json(node: NodeRecord) -> dict:
    streams = []
    for key, load in sorted(node.streams.items()):
        scope, _, name = key.partition("/")
        streams.append({"name": name, "scope": "/" + scope, "subscribers": load.subscribers,
                        "relays": load.relays, "publishing": load.publishing, "startTime": load.start_ms})
    return {
        "id": node.id,
        "group": node.group,
        "role": node.role,
        "region": node.region,
        "state": node.state,
        "serverAddress": node.host,
        "rtmpPort": node.rtmp_port,
        "agentUrl": node.agent_url,
        "capacity": node.capacity,
        "load": round(node.used / node.capacity, 4) if node.capacity else 1.0,
        "publishers": node.publishers,
        "subscribers": node.subscribers,
        "cpu": node.cpu,
        "startedMs": node.started_ms,
        "updatedMs": node.updated_ms,
        "streams": streams,
    }


# -- the 2.0 API ------------------------------------------------------------------------------------
@api.get("/event/list")
def list_streams(version: str):
    return _listing("list", listing_json)


@api.get("/event/list/stats")
def list_streams_with_stats(version: str):
    return _listing("stats", stats_json)


def _listing(kind: str, to_json) -> Response:
    require_view()
    svc = services()
    body = svc.listings.get(kind, svc.view, lambda: orjson.dumps([to_json(s) for s in svc.view.live_streams()]))
    return Response(body, mimetype="application/json")


@api.get("/event/<scope>/<stream>")
def lookup(version: str, scope: str, stream: str):
    if request.method == "HEAD":
        # A lookup places a client: it reserves a new stream's origin and counts against the node it
        # answers. HEAD must not change anything (a monitor's HEAD reserved streams and filled origins).
        raise MethodNotAllowed(valid_methods=["GET"], description="a lookup has effects: use GET")
    status, body = answer_lookup(services(), scope, stream, request.args.get("action"), request.args.get("region"),
                                 request.args.get("strict"))
    return Response(body, status=status, mimetype="application/json")


def answer_lookup(svc: "Services", scope: str, stream: str, action: str | None, region: str | None,
                  strict: str | None) -> tuple[int, bytes]:
    """A broadcast or subscribe lookup: (HTTP status, JSON body), errors in the documented shape.
    Shared by the Flask route and the server's front (streammanager.front), so both answer exactly alike."""
    if action not in LOOKUP_ACTIONS:
        LOOKUP_STATS.record("invalid", "bad_request")
        if action is None or action == "":
            return 400, error_body("missing action: use action=broadcast or action=subscribe")
        return 400, error_body(f"unknown action {action[:40]!r}: use broadcast or subscribe")
    started = time.perf_counter()
    outcome = "ok"
    try:
        key = stream_key(scope, stream)
        region_name, is_strict = parse_region(region), parse_strict(strict)
        if not svc.view.initialized:
            raise ServiceUnavailable("the registry view is not loaded yet (ZooKeeper unreachable?)")
        placement = svc.placement
        answer = (placement.broadcast if action == "broadcast" else placement.subscribe)(key, region_name,
                                                                                          is_strict)
        return 200, orjson.dumps(answer.to_json())
    except ApiError as exc:
        outcome = "no_capacity" if isinstance(exc, NoCapacity) else \
            {400: "bad_request", 404: "not_found"}.get(exc.status, "error")
        return exc.status, error_body(exc.message)
    finally:
        LOOKUP_STATS.record(action, outcome, time.perf_counter() - started)


def query_args(query: str) -> dict[str, str]:
    """A lookup's query parameters, the first value of each winning, as ``request.args.get`` does."""
    args: dict[str, str] = {}
    if not query:
        return args
    if "%" in query or "+" in query:  # something to decode: the standard library's parser
        pairs = parse_qsl(query, keep_blank_values=True)
    else:  # nothing to decode (a lookup's usual query): the same pairs, for a fifth of the cost
        pairs = (part.partition("=")[::2] for part in query.split("&") if part)
    for name, value in pairs:
        args.setdefault(name, value)
    return args


def error_body(message: str) -> bytes:
    return orjson.dumps({"errorMessage": message, "timestamp": now_ms()})


@api.get("/event/<scope>/<path:rest>")
def lookup_nested(version: str, scope: str, rest: str):
    raise BadRequest("scope and stream names must each be one path segment "
                     f"(got {scope[:40]}/{rest[:80]}; '/' cannot be part of a name)")


@api.get("/event/<scope>/<stream>/stats")
def stream_stats(version: str, scope: str, stream: str):
    key = stream_key(scope, stream)
    require_view()
    live = services().view.live_stream(key)
    if live is None:
        raise NotFound(f"stream {key.scope_path}/{key.name} is not live")
    return jsonify(stats_json(live))


@api.delete("/admin/event")
def clear_streams(version: str):
    """Clear stream ownership records and broadcast reservations. Publishing is not touched: agents
    that still publish a stream claim it again at once (they watch their claims)."""
    require_admin()
    svc = services()
    if not svc.client.connected:
        raise ServiceUnavailable("ZooKeeper is unreachable: nothing was cleared")
    try:
        count = delete_children_twice_deep(svc.client, svc.paths.streams, ADMIN_ZK_TIMEOUT_S)
        reservations = delete_children_twice_deep(svc.client, svc.paths.reservations, ADMIN_ZK_TIMEOUT_S)
    except (KazooException, svc.client.handler.timeout_exception) as exc:
        log.warning("clearing stream entries failed: %s", exc)
        raise ServiceUnavailable(f"the registry did not complete the clear ({str(exc) or type(exc).__name__}): "
                                 "some entries may be left; try again") from None
    log.info("admin cleared %d stream records and %d reservations", count, reservations)
    return jsonify({"count": count, "timestamp": now_ms()})


@api.get("/admin/node")
def list_nodes(version: str):
    require_admin()
    require_view()
    return jsonify([node_json(n) for n in sorted(services().view.nodes(), key=lambda n: n.id)])


@api.get("/admin/node/<node_id>")
def get_node(version: str, node_id: str):
    require_admin()
    try:
        validate_name("node", node_id)
    except RecordError as exc:
        raise BadRequest(str(exc)) from None
    node = services().view.node(node_id)
    if node is None:
        raise NotFound(f"no node {node_id!r}")
    return jsonify(node_json(node))


# -- operations -------------------------------------------------------------------------------------
@ops.get("/healthz")
def healthz():
    status, body = health(services().view)
    return jsonify(body), status


def health(view: RegistryView) -> tuple[int, dict]:
    """``/healthz``: (HTTP status, body). Shared by the Flask route and the server's front."""
    age_ms = view.age_ms()
    body = {
        "status": "ok" if view.connected and view.initialized else ("degraded" if view.initialized else "starting"),
        "zookeeper": "connected" if view.connected else "disconnected",
        "viewAgeMs": age_ms,
        "nodes": view.node_count(),
        "liveStreams": view.stream_count(),
        "registrySource": view.source,
    }
    return (200 if view.initialized else 503), body


def _count_view_changes(view: RegistryView) -> None:
    """Bring the counter up to the view's own count (read at scrape time: nothing on the update path)."""
    if view.changes_at_load is None:
        return  # not loaded yet
    with _changes_lock:
        # from the load on: a restarted worker's first load (the whole registry) is no change of it
        applied, counted = view.changes, _changes_counted.get(view, view.changes_at_load)
        if applied > counted:
            VIEW_CHANGES.inc(applied - counted)
            _changes_counted[view] = applied


def refresh_view_metrics(view: RegistryView) -> None:
    """This worker's view gauges and its share of ``sm_view_changes_total``, brought up to date: every
    second by the housekeeper, and before this worker answers a scrape."""
    VIEW_NODES.set(view.node_count())
    VIEW_STREAMS.set(view.stream_count())
    VIEW_AGE.set(view.age_ms() / 1000)
    VIEW_DECODE_ERRORS.set(view.decode_errors)
    _count_view_changes(view)


@ops.get("/metrics")
def metrics():
    refresh_view_metrics(services().view)
    LOOKUP_STATS.flush()
    registry = current_app.config.get("PROMETHEUS_REGISTRY")
    payload = generate_latest(registry) if registry is not None else generate_latest()
    # content_type, not mimetype: Flask appends "; charset=utf-8" to a text mimetype, and
    # CONTENT_TYPE_LATEST has its charset already. A duplicate parameter is an invalid media type
    # (Go's mime.ParseMediaType refuses it: Prometheus 3 fails the scrape).
    return Response(payload, content_type=CONTENT_TYPE_LATEST)
