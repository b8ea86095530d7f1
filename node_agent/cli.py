"""``node-agent``: run one media node's agent in the foreground until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

from werkzeug.serving import WSGIRequestHandler, make_server

from node_agent.agent import Agent
from node_agent.config import AGENT_COORDINATOR_OPTIONS, AGENT_OPTIONS, AgentSettings
from node_agent.hooks import create_hooks_app
from node_agent.media import MediaError
from streammanager import logs
from streammanager.config import ConfigError, add_options
from streammanager.process import stop_event_on_signals

log = logging.getLogger("node_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node-agent",
        description="Registers a media node in the streammanager registry, reports its load, and "
                    "answers its media server's hooks. Every option is also an AGENT_ environment variable.",
    )
    add_options(parser, AGENT_OPTIONS)
    add_options(parser, AGENT_COORDINATOR_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = AgentSettings.from_env(args=args)
    except ConfigError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format, context={"node_id": settings.node_id})
    try:
        agent = Agent(settings)
    except RuntimeError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        return 2
    try:
        listener = listen(settings.http_host, settings.http_port)
    except OSError as exc:
        print(f"node-agent: cannot listen on {settings.http_host}:{settings.http_port} (--http-host/--http-port, "
              f"AGENT_HTTP_HOST/AGENT_HTTP_PORT): {exc.strerror or exc}", file=sys.stderr)
        return 1
    with listener:  # werkzeug serves a duplicate of it
        server = make_server(settings.http_host, settings.http_port, create_hooks_app(agent), threaded=True,
                             request_handler=HookRequestHandler, fd=listener.fileno())
    stop = stop_event_on_signals()
    threading.Thread(target=_exit_if_stop_hangs, args=(stop,), name="stop-watchdog", daemon=True).start()
    # serve hooks before nginx starts: its first hook may come at once
    # its stop (shutdown) waits for the loop to look again: a stop took half a second, the default
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="agent-http",
                               daemon=True)
    serving.start()
    try:
        started = agent.start(stop=stop)
    except MediaError as exc:
        print(f"node-agent: {exc}", file=sys.stderr)
        agent.stop()
        server.shutdown()
        return 2
    except Exception as exc:
        # some of kazoo's errors have no message (an ACL that refuses this identity: NoAuthError()): name them
        print(f"node-agent: cannot register in ZooKeeper at {settings.zk_hosts}: {str(exc) or type(exc).__name__}",
              file=sys.stderr)
        agent.stop()
        server.shutdown()
        return 1
    if not started:  # stopped while it waited for ZooKeeper: at once, not at the stop deadline
        log.info("stopped before it registered", extra={"node_id": settings.node_id})
        agent.stop()
        server.shutdown()
        return 0
    threading.Thread(target=_fence_if_stalled, args=(agent, stop), name="stall-watchdog", daemon=True).start()
    log.info("agent serving hooks on %s", settings.agent_url,
             extra={"node_id": settings.node_id, "role": settings.role, "region": settings.region})
    stop.wait()
    log.info("stopping", extra={"node_id": settings.node_id})
    agent.stop()
    server.shutdown()
    server.server_close()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The hooks' listening socket, bound here: werkzeug's own bind printed its message ("Port 8090 is in
    use by another program", naming no option) and called sys.exit itself."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


LISTEN_BACKLOG = 128  # werkzeug's own
STOP_DEADLINE_S = 20.0
PAUSE_S = 3.0  # the stall watchdog (a 1 s loop) did not run for this long: the process was stopped, not stalled
HOOK_SOCKET_TIMEOUT_S = 10.0
FENCE_CLOSE_WAIT_S = 2.0  # a stalled agent gives the close of its session this long before it exits


class HookRequestHandler(WSGIRequestHandler):
    """werkzeug's handler with a socket timeout: without one, a client that connected and sent nothing, or
    half a request, or a body shorter than its Content-Length, held its thread and descriptor forever, and
    a few hundred of them left nginx's hooks (every publish and play) unanswered. nginx-rtmp sends a
    hook's whole request at once and waits for the answer."""

    timeout = HOOK_SOCKET_TIMEOUT_S


def _fence_if_stalled(agent: Agent, stop: threading.Event, exit=os._exit) -> None:
    """Liveness is the ZooKeeper session, which kazoo's own thread keeps alive even if the agent is
    stuck; so an agent whose report loop stops running closes its session itself (its node and streams
    leave every answer) and exits for its supervisor to restart it."""
    limit_s = agent.settings.stall_timeout_s
    last_check = resumed = time.monotonic()
    while not stop.wait(1.0):
        now = time.monotonic()
        if now - last_check > PAUSE_S:
            # the watchdog itself did not run: the whole process was stopped (SIGSTOP, a frozen container
            # or VM), not its report loop alone; that loop gets a whole limit from now before it counts
            # as stalled (else the agent exited at once on SIGCONT, dropping every publisher its nginx
            # still served, where it only had to register again)
            log.warning("the agent did not run for %.0f s (stopped or frozen): resuming", now - last_check,
                        extra={"node_id": agent.settings.node_id})
            resumed = now
        last_check = now
        stalled_s = now - max(agent.last_progress, resumed)
        if stalled_s > limit_s:
            log.critical("the report loop has not run for %.0f s: closing the session and exiting", stalled_s,
                         extra={"node_id": agent.settings.node_id})
            # in a thread: a stop stuck on ZooKeeper must not keep the agent from exiting; but one that
            # is done (the usual case) is not waited out to the end of its allowance
            closing = threading.Thread(target=agent.client.stop, daemon=True)
            closing.start()
            closing.join(FENCE_CLOSE_WAIT_S)
            exit(70)
            return


def _exit_if_stop_hangs(stop: threading.Event) -> None:
    """Whatever the agent is doing when asked to stop (waiting on an unreachable ZooKeeper at start-up,
    a stuck child), the process ends within STOP_DEADLINE_S; its children die with it (PDEATHSIG)."""
    stop.wait()
    time.sleep(STOP_DEADLINE_S)
    log.error("stopping took over %.0f s: exiting now", STOP_DEADLINE_S)
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
