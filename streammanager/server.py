"""``streammanager serve``: the API under gunicorn, asyncio (ASGI) workers.

Each worker runs one event loop (gunicorn's ``asgi`` worker class) with :class:`streammanager.front.ApiFront`:
lookups and ``/healthz`` answered on the loop, every other route by the Flask app on a thread pool.
Each worker builds its own app (and so its own ZooKeeper client and registry view) after the fork:
a KazooClient started before a fork hangs in the child, so nothing is preloaded. Prometheus metrics
are aggregated across workers through prometheus-client's multiprocess mode.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from http import HTTPStatus

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.asgi import protocol as gunicorn_protocol
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers.gasgi import ASGIWorker

from streammanager.config import SERVER_OPTIONS, ServerSettings
from streammanager.process import Supervised

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.001
GC_THRESHOLDS = (50_000, 20, 100)


FRESH_CONNECTION_GRACE_S = 0.25  # a stop waits this long for a request on a connection that has sent none


class ApiWorker(ASGIWorker):
    """gunicorn's ASGI worker, but a stop does not wait for idle keep-alive connections.

    gunicorn's worker waits up to ``graceful_timeout`` (10 s) for every open connection to close, idle
    ones included: one client that keeps a connection open (a load balancer, an SDK's pool) made every
    stop take 10 s, longer than some supervisors wait before SIGKILL (Docker's default is 10 s), and a
    killed server leaves its ZooKeeper session to time out. Here the
    connections waiting for their next request are closed as the stop begins, as uvicorn does; requests
    in progress are finished as before, their connections closed after the answer.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._protocols: "weakref.WeakSet" = weakref.WeakSet()
        self._serving: asyncio.Task | None = None
        self._beating = False  # gunicorn's serving loop sleeps between two heartbeats

    # gunicorn's serving loop checks ``alive`` once a second, between heartbeats (``notify()`` then
    # ``asyncio.sleep(1.0)``): a SIGTERM waited for the end of that sleep, up to a second, before the stop
    # began (and every `serve` stop took a second more than its work). A stop signal now ends the sleep:
    # the loop's task is cancelled, which gunicorn's loop takes as the end of serving, and the stop begins.
    def notify(self):
        super().notify()
        # gunicorn calls this from its serving loop only, right before the sleep: until that loop ends,
        # the serving task waits in the sleep whenever a signal handler (a loop callback) runs
        self._beating = self._serving is not None

    def handle_exit_signal(self):
        super().handle_exit_signal()
        self._end_heartbeat()

    def handle_quit_signal(self):
        super().handle_quit_signal()
        self._end_heartbeat()

    def _end_heartbeat(self) -> None:
        if self._beating and not self.alive:
            self._beating = False
            self._serving.cancel()

    async def _serve(self):
        self._serving = asyncio.current_task()
        create_server = self.loop.create_server
        protocols = self._protocols

        async def tracking_create_server(factory, *args, **kwargs):
            # asyncio listen()s on the socket again with its own backlog (100), not gunicorn's "backlog"
            kwargs.setdefault("backlog", self.cfg.backlog)

            def tracked():
                protocol = factory()
                if type(protocol) is ASGIProtocol:
                    protocol.__class__ = ApiProtocol  # the same connection, errors in the API's shape
                protocols.add(protocol)
                return protocol
            return await create_server(tracked, *args, **kwargs)

        self.loop.create_server = tracking_create_server
        self.loop.set_exception_handler(_AcceptErrors(self.log, self.loop.get_exception_handler()))
        await super()._serve()

    async def _shutdown(self):
        self._beating = False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()  # the cancel only ended the heartbeat's sleep: the stop's own waits go on
        idle = [p for p in list(self._protocols) if _idle(p)]
        # A connection that has served nothing yet was just opened for a request, which is on its way:
        # closed at once with the others, that request was reset (a lost request at every reload or
        # rolling restart). It gets FRESH_CONNECTION_GRACE_S to begin one; the kept-alive ones close now.
        fresh = [p for p in idle if getattr(p, "req_count", 2) <= 1]
        kept_alive = [p for p in idle if p not in fresh]
        for protocol in kept_alive:
            protocol.transport.close()
        if fresh:
            await asyncio.sleep(FRESH_CONNECTION_GRACE_S)
            fresh = [p for p in fresh if _idle(p)]
            for protocol in fresh:
                protocol.transport.close()
        if idle:
            self.log.info("closed %d idle keep-alive connections", len(kept_alive) + len(fresh))
        await super()._shutdown()


class _AcceptErrors:
    """The loop's exception handler: "socket.accept() out of system resource" (EMFILE: the worker is out of
    file descriptors) said once per ``EVERY_S``. asyncio (3.11) logs it with a traceback for every accept
    attempt, ``backlog`` attempts each time the listener is readable, and retries every second: a few
    hundred idle connections wrote tens of thousands of tracebacks a minute. Anything else goes on as before."""

    EVERY_S = 10.0

    def __init__(self, log, previous):
        self._log = log
        self._previous = previous
        self._last = -self.EVERY_S
        self._suppressed = 0

    def __call__(self, loop, context) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            now = time.monotonic()
            if now - self._last < self.EVERY_S:
                self._suppressed += 1
                return
            self._log.warning("cannot accept connections: %s (%d more times in the last %.0f s); accepting "
                              "again as descriptors free up", context.get("exception"), self._suppressed,
                              self.EVERY_S)
            self._last, self._suppressed = now, 0
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


class ApiProtocol(ASGIProtocol):
    """gunicorn's connection, with five changes: the errors gunicorn answers itself (before the app sees
    a request: a request line over 4 KB, headers over its limits, bytes that are not HTTP) come in the
    API's documented shape, ``{"errorMessage", "timestamp"}`` as JSON, not text/plain (gunicorn's status
    stays: 414, 431, 400, 501 are the precise ones); a connection's first request must come within
    ``FIRST_REQUEST_TIMEOUT_S``; no request is taken for a WebSocket handshake; a client that
    half-closes after its request gets the answer; and a client that leaves before its answer, or in the
    middle of its request body, leaves no connection behind. These override
    gunicorn 27's connection class (private methods): ``tests/test_serve.py`` checks each."""

    _peer_done = False  # the client half-closed: it sends no more requests

    def connection_made(self, transport):
        super().connection_made(transport)
        # gunicorn times out a connection idle between requests (keepalive) but not before its first: a
        # client that connected and sent nothing, half a request line, or headers without their blank
        # line, held its connection (a file descriptor) for good, and a few hundred of them took every
        # descriptor of the worker. Its own keep-alive timer, armed here for the first request too, closes
        # such a connection; the complete headers of a request cancel it, as they do between requests.
        if getattr(self, "_request_ready", None) is not None and getattr(self, "_keepalive_handle", 0) is None:
            self._keepalive_handle = self.worker.loop.call_later(FIRST_REQUEST_TIMEOUT_S, self._keepalive_timeout)

    def eof_received(self):
        # A client that sends its request and then half-closes (shutdown(SHUT_WR): `nc -N`, some health
        # checkers) still reads the answer. gunicorn's connection leaves this to asyncio, which closes the
        # transport at once: the request was served into a closed socket and the client read nothing.
        # With a request taken, the transport stays open for the answers, and the connection closes after
        # the last request the client sent (the ones it pipelined before the EOF are served first: ending
        # the connection after the first answer dropped them). Without one, it closes as before.
        # A request whose body has not all arrived never will: closed as before, and the app reading
        # the body is told the client left (it waited for the body's 10 s timeout, then answered no one).
        ready = getattr(self, "_request_ready", None)
        receiver = getattr(self, "_body_receiver", None)
        if receiver is not None and getattr(receiver, "_complete", True) is False:
            return None
        if ready is not None and (ready.is_set() or getattr(self, "_current_request", None) is not None
                                  or getattr(self, "_finishing_calls", None)):
            self._peer_done = True
            return True
        return None

    def _feed_callback_parser(self, data):
        # After the client's EOF, the only bytes fed are the requests it pipelined before it (gunicorn
        # feeds them again once the request before them is answered). One whose body the EOF cut short
        # was waited for until the body's 10 s timeout and answered 408 to no one, the connection held
        # all along (eof_received closes at once only a body under way when the EOF is read): closed here.
        if not super()._feed_callback_parser(data):
            return False
        receiver = getattr(self, "_body_receiver", None)
        if self._peer_done and receiver is not None and getattr(receiver, "_complete", True) is False:
            self._close_transport()
            return False
        return True

    def _close_transport(self):
        # gunicorn's calls write_eof() and close() in one try: when write_eof() fails (shutdown() raises
        # ENOTCONN once the client reset the connection, as it does when it closed its socket before the
        # answer came), close() was never called. Kept open after the client's EOF (eof_received), such a
        # connection was never closed: a client that gave up on its request leaked a descriptor of the
        # worker, and a stop waited out the graceful timeout (10 s) for it.
        transport = getattr(self, "transport", None)
        was_open = transport is not None and not getattr(self, "_closed", True)
        super()._close_transport()
        if was_open and not transport.is_closing():
            transport.close()

    def _will_close(self, request, response_requires_close):
        # after a half-close, the answer to the last request the client sent ends the connection
        if super()._will_close(request, response_requires_close):
            return True
        if not self._peer_done:
            return False
        parser = getattr(self, "_callback_parser", None)
        return parser is None or not parser.remaining()  # no request pipelined behind this one

    def _arm_keepalive_timer(self):
        if self._peer_done:  # idle after a half-close: no request can come
            self._keepalive_timeout()
            return
        super()._arm_keepalive_timer()

    def _is_websocket_upgrade(self, request):
        # The API has no WebSocket route: gunicorn answered an "Upgrade: websocket" request to any route
        # with its own empty 403. Served as the plain HTTP request it also is, it gets the route's answer.
        return False

    def _send_error_response(self, status, message, extra_headers=()):
        from streammanager.api import error_body

        # gunicorn's message alone is often a fragment of the request ("get", "HTTP/1.2"): say what it is
        reason = _reason(status)
        detail = str(message)[:300]
        body = error_body(f"{reason.lower()}: {detail}" if detail and detail != reason else reason.lower())
        headers = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        self._safe_write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n".encode("latin-1"))
        self._safe_write(body)


FIRST_REQUEST_TIMEOUT_S = 10.0  # a connection's first request headers must arrive within this


def _reason(status: int) -> str:
    # gunicorn's table first, as gunicorn does: the standard library's phrases differ between versions
    phrase = getattr(gunicorn_protocol, "_REASON_PHRASES", {}).get(status)
    if phrase:
        return phrase
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _idle(protocol) -> bool:
    """Whether a connection waits for its next request with no byte of it received. gunicorn keeps this
    in private attributes: if they change, nothing is idle and gunicorn's own graceful wait applies."""
    parser = getattr(protocol, "_callback_parser", None)  # gunicorn's pure-Python HTTP/1 parser
    held = getattr(parser, "_buffer", None)
    return (getattr(protocol, "_awaiting_request", False) is True and getattr(parser, "_state", None) == "request_line"
            and held is not None and len(held) == 0 and getattr(protocol, "transport", None) is not None)


class GunicornLogger(glogging.Logger):
    """gunicorn's error log in this server's log format: with SM_LOG_FORMAT=json its own lines ("Booting
    worker", "Worker timeout", its tracebacks) are JSON objects like every other line, not
    ``[date] [pid] [LEVEL] text``, which a JSON log pipeline cannot parse."""

    log_format = "json"  # set by ApiServer.load_config (the master's, inherited by every worker)

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if self.log_format == "json":
            from streammanager.logs import JsonFormatter

            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())

    def info(self, msg, *args, **kwargs) -> None:
        if msg.startswith("Listening at:") and args and not args[0]:
            return  # with a socket per worker the master has none to name: _when_ready says where we listen
        super().info(msg, *args, **kwargs)


def _pre_request(worker, req) -> None:
    # gunicorn's own hook logs the decoded path as it is: "%0A" in a path wrote a line of the
    # client's choosing into the log (a forged JSON record too). ascii() escapes control characters.
    worker.log.debug("%s %s", req.method, ascii(req.path)[1:-1])


class ApiServer(BaseApplication):
    def __init__(self, settings: ServerSettings, metrics_dir: str, view_wait_s: float = 5.0):
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.view_wait_s = view_wait_s
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        GunicornLogger.log_format = s.log_format
        for key, value in {
            "bind": [s.bind],
            "workers": s.workers,
            # gunicorn's asyncio (ASGI) worker, closing idle keep-alive connections at shutdown (ApiWorker):
            # lookups on the loop, Flask on a thread pool (streammanager.front)
            "worker_class": "streammanager.server.ApiWorker",
            "asgi_loop": "asyncio",
            "asgi_lifespan": "on",  # the front closes its ZooKeeper session when the worker stops
            "preload_app": False,
            "keepalive": 30,
            "backlog": 2048,
            # SM_REUSE_PORT: a listening socket per worker (SO_REUSEPORT), the kernel spreads connections
            # across workers; one shared socket let whichever worker woke first take most keep-alive clients
            "reuse_port": s.reuse_port,
            "graceful_timeout": 10,
            "timeout": 30,
            "accesslog": None,
            "loglevel": s.log_level.lower(),
            "logger_class": "streammanager.server.GunicornLogger",
            "pre_request": _pre_request,
            "proc_name": "streammanager-api",
            "child_exit": _child_exit,
            "when_ready": _when_ready,
            "control_socket_disable": True,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        from streammanager import logs
        from streammanager.api import create_app

        # The registry view's reader thread and the Flask threads can be CPU-bound while the event loop
        # mostly waits on sockets: with the default 5 ms GIL switch interval, every connection of the
        # loop queues behind them (the convoy effect).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        logs.configure(self.settings.log_level, self.settings.log_format)
        # A worker listens once its view is loaded, or after VIEW_WAIT_S without ZooKeeper: then it answers
        # /healthz and lookups with 503 until the view loads (a load balancer sees why), not silence.
        app = create_app(self.settings, init_timeout_s=self.view_wait_s)
        # The registry view holds millions of long-lived objects; without this, each full collection
        # walks them all and stalls every request for tens of milliseconds.
        # Collect young objects far less often: every registry update allocates hundreds of objects,
        # so the default threshold (a collection per 700 net allocations) kept collecting a heap of
        # millions (make bench, 1000 nodes, side by side: ratio 0.40 -> 0.69). Records are acyclic:
        # refcounting frees them; the collector only has cycles left to find.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        app.config["PROMETHEUS_REGISTRY"] = registry
        from streammanager.front import ApiFront

        return ApiFront(app, threads=self.settings.threads)


def _when_ready(server) -> None:
    # with reuse_port the master holds no socket and gunicorn's own "Listening at:" names none
    cfg = server.cfg
    sockets = "a socket per worker (SO_REUSEPORT)" if cfg.reuse_port else "one shared socket"
    server.log.info("streammanager API on http://%s: %d workers, %s", ",".join(cfg.bind), cfg.workers, sockets)


def _child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def address_in_use(bind: str) -> str | None:
    """Why ``bind`` cannot be ours, or None. With SM_REUSE_PORT (the default) each worker opens its own
    SO_REUSEPORT socket, and such sockets share a port with any other server that set the flag (a second ``streammanager serve`` on
    the same address would silently take half the traffic): a plain bind first says whether the port
    is really free."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc}"
    family, _, _, _, address = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    # as gunicorn's own sockets: connections of a server that just stopped linger in TIME_WAIT for a
    # minute, and a plain bind refused to start a new server until they were gone; a listener still fails it
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(address)
    except OSError as exc:
        return f"cannot listen on {bind}: {exc.strerror or exc} (is another server running there?)"
    finally:
        probe.close()
    return None


class Interrupted(BaseException):
    """SIGTERM or SIGINT before gunicorn runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def serve(settings: ServerSettings) -> int:
    from streammanager import logs

    # the master's own records, and the registry feed's lines (pumped into the master's log by
    # Supervised), were dropped: the master configured no logging (workers do, in ApiServer.load)
    logs.configure(settings.log_level, settings.log_format)
    problem = address_in_use(settings.bind)
    if problem:
        print(f"streammanager serve: {problem}", file=sys.stderr)
        return 2
    if settings.commands_auth is None or settings.commands_auth.method is None:
        # the coordinator's specification allows it, but the route shares the public lookup port and the
        # stream list is public: without credentials, anyone who reaches the server closes every stream
        log.warning("COMMANDS_API_AUTH is unset: POST /commands/close takes no credentials, so anyone who "
                    "reaches this server can close any live stream; set COMMANDS_API_AUTH=Bearer (or Basic)")
    metrics_dir = tempfile.mkdtemp(prefix="sm-metrics-")
    # must be set before prometheus_client is imported anywhere in this process tree
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # Import (not start) the app's modules in the master so that workers boot in milliseconds; the
    # ZooKeeper client is created per worker, after the fork.
    import streammanager.api  # noqa: F401

    master = os.getpid()
    feed_dir = feed = None
    view_wait_s = VIEW_WAIT_S
    # Until gunicorn installs its own handlers, SIGTERM and Ctrl-C unwind this frame: a server stopped
    # while it waits for its feed stops the feed and removes its directories
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        if settings.registry_feed:
            feed_dir = tempfile.mkdtemp(prefix="sm-feed-")  # private (0700): only this user's workers read it
            feed = FeedKeeper(settings, feed_dir)
            settings = dataclasses.replace(settings, feed_socket=feed.socket_path)
            if not feed.start():
                # the master has waited FEED_START_S for ZooKeeper already (the feed's own connection):
                # a server started before ZooKeeper was silent for both waits, about 10 s
                view_wait_s = VIEW_WAIT_AFTER_NO_FEED_S
        ApiServer(settings, metrics_dir, view_wait_s).run()
    except Interrupted as stopped:
        return 128 + stopped.signum
    finally:
        # Workers are forks of this process and leave through sys.exit(), unwinding this very frame:
        # only the master may remove the directory the other workers still write to.
        if os.getpid() == master:
            if feed is not None:
                feed.stop(5)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if feed_dir:
                shutil.rmtree(feed_dir, ignore_errors=True)
    return 0


FEED_START_S = 5.0  # the feed is up in well under a second when ZooKeeper answers
VIEW_WAIT_S = 5.0
VIEW_WAIT_AFTER_NO_FEED_S = 1.0  # the first workers' wait when the feed did not come up within FEED_START_S
FEED_SETTINGS = ("zk_hosts", "zk_root", "zk_timeout_s", "zk_auth", "log_level", "log_format")


def feed_environment(settings: ServerSettings) -> dict[str, str]:
    """The feed's environment: this server's own, with the settings the feed reads as this server
    resolved them (a command-line option wins over the environment; the feed has no options of its own:
    given ``--zk-hosts`` alone, it watched the default ZooKeeper)."""
    env = dict(os.environ)
    for option in SERVER_OPTIONS:
        if option.field in FEED_SETTINGS:
            value = getattr(settings, option.field)
            env[option.env] = "" if value is None else str(value)  # empty: the option's default
    return env


def _wait_exit(pid: int) -> str:
    """Wait until the child ``pid`` exits, without reaping it, and say how it ended. gunicorn's master
    reaps every child on SIGCHLD (``waitpid(-1)``), so a plain wait would often find the child gone
    and its status lost; even so the master may reap it first, and then how it ended is not known."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped by the master first
        return "ended"
    if info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        try:
            return f"was killed by {signal.Signals(info.si_status).name}"
        except ValueError:
            return f"was killed by signal {info.si_status}"
    return f"exited with code {info.si_status}" if info is not None else "ended"


class FeedKeeper:
    """The host's registry feed (``python -m streammanager.feed``), started again whenever it exits.

    A feed that exits (a crash, the kernel's OOM killer, an operator's kill) leaves every worker watching
    ZooKeeper by itself: correct, but at a thousand nodes that halves their lookups a second (README,
    Benchmarks). So a new feed starts after a back-off (1 s, doubling up to 30 s while feeds keep exiting
    within a minute of starting), and the workers return to it once it has loaded the registry
    (:class:`streammanager.registry.RegistryView`). A hung feed is not this keeper's to find: the
    workers stop listening to it after ``feed.SILENCE_S`` and do not return until it answers.
    """

    RESTART_MIN_S = 1.0
    RESTART_MAX_S = 30.0
    STABLE_S = 60.0  # a feed that ran this long resets the back-off

    def __init__(self, settings: ServerSettings, feed_dir: str):
        self.socket_path = os.path.join(feed_dir, "registry.sock")
        self._env = feed_environment(settings)
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a stop and a restart never cross
        self._feed: Supervised | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._feed.pid if self._feed is not None else None

    def _launch(self) -> Supervised:
        feed = Supervised("registry-feed", [sys.executable, "-m", "streammanager.feed", "--socket", self.socket_path],
                          log_name="streammanager.feed", env=self._env, passthrough=True)
        feed.start()
        return feed

    def start(self) -> bool:
        """Start the feed and wait until it listens, so that workers booting now use it: whether it does.
        If it is not up in time, workers that find no socket watch ZooKeeper themselves until it is."""
        with self._lock:
            self._feed = self._launch()
        feed = self._feed
        deadline = time.monotonic() + FEED_START_S
        while not os.path.exists(self.socket_path) and feed.running and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(self.socket_path):
            log.warning("the registry feed is not up after %.0f s: workers watch ZooKeeper themselves until it is",
                        FEED_START_S)
        self._thread = threading.Thread(target=self._keep, name="feed-keeper", daemon=True)
        self._thread.start()
        return os.path.exists(self.socket_path)

    def _keep(self) -> None:
        # This thread starts every later feed (forked by the process's spawner thread, which outlives it:
        # streammanager.process).
        delay = self.RESTART_MIN_S
        while True:
            feed = self._feed
            started = time.monotonic()
            how = _wait_exit(feed.pid)
            feed.poll()  # reap it, unless gunicorn's master did (it waits for any child)
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.STABLE_S:
                delay = self.RESTART_MIN_S
            log.warning("the registry feed (pid %s) %s: starting another in %.0f s; workers watch ZooKeeper "
                        "themselves meanwhile", feed.pid, how, delay)
            if self._stopping.wait(delay):
                return
            delay = min(2 * delay, self.RESTART_MAX_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._feed = self._launch()
            log.info("registry feed started again (pid %s)", self._feed.pid)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            feed = self._feed
        if feed is not None:
            feed.stop(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
