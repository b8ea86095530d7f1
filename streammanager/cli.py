"""``streammanager``: serve the API, run the controller, run a local ZooKeeper, run a demo cluster."""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from streammanager.config import (
    CONTROLLER_OPTIONS,
    SERVER_OPTIONS,
    ConfigError,
    ControllerSettings,
    ServerSettings,
    add_options,
    port,
    positive,
)
from streammanager.coordinator_config import COMMANDS_API_OPTIONS, EVENT_CALLBACK_OPTIONS


def _argument(parse):
    """An argparse ``type`` from one of config's parsers: a bad value is argparse's usage error, naming
    the option, not a traceback."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad value {text!r}: {exc}") from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


PORT = _argument(port)
POSITIVE_INT = _argument(positive(int))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammanager",
        description="Geo-distributed stream manager for live video: answers where to publish and where "
                    "to play from a live ZooKeeper registry of origin and edge media nodes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP API (gunicorn, asyncio workers)",
                           description="Run the Stream Manager 2.0 API. Every option is also an environment variable "
                                       "(named in its help: SM_..., and COMMANDS_API_AUTH... for the "
                                       "commands API).")
    add_options(serve, SERVER_OPTIONS)
    add_options(serve, COMMANDS_API_OPTIONS)

    controller = sub.add_parser(
        "controller", help="run the controller (autoscaler and leader-only duties; one of several leads)",
        description="Run a controller. Several may run; one leads (ZooKeeper election) and keeps every node "
                    "group at the right size through its cloud provider. Every option is also an environment "
                    "variable (named in its help: SM_..., and EVENT_CALLBACK_... for event callbacks).")
    add_options(controller, CONTROLLER_OPTIONS)
    add_options(controller, EVENT_CALLBACK_OPTIONS)

    zk = sub.add_parser("zookeeper", help="run a standalone ZooKeeper on 127.0.0.1 in the foreground",
                        description="Run ZooKeeper from the Debian package on 127.0.0.1 (admin server off, "
                                    "heap capped) until SIGTERM or Ctrl-C.")
    zk.add_argument("--port", type=PORT, default=2181, help="client port [default 2181]")
    zk.add_argument("--data-dir", type=Path, default=None,
                    help="data directory [default $XDG_STATE_HOME/streammanager/zookeeper]")
    zk.add_argument("--heap-mb", type=POSITIVE_INT, default=256, help="JVM heap cap in MB [default 256]")
    zk.add_argument("--tick-ms", type=POSITIVE_INT, default=500,
                    help="tickTime in ms; small means fast failure detection [default 500]")

    demo = sub.add_parser("demo", help="run a whole local cluster until Ctrl-C",
                          description="Start ZooKeeper, the API server and a controller whose node group "
                                      "launches an origin and an edge in each of two regions on loopback "
                                      "addresses (and more under load), print how to use them, and stop "
                                      "everything on Ctrl-C.")
    demo.add_argument("--api-port", type=PORT, default=5080, help="API port on 127.0.0.1 [default 5080]")
    demo.add_argument("--zk-port", type=PORT, default=2181, help="ZooKeeper port [default 2181]")
    demo.add_argument("--regions", default="us-east-1,eu-west-1",
                      help="comma-separated regions [default us-east-1,eu-west-1]")
    demo.add_argument("--media", choices=("nginx", "none"), default="nginx",
                      help="media server of the nodes: nginx-rtmp, or none for simulated nodes [default nginx]")
    demo.add_argument("--agent-base-port", type=PORT, default=8700,
                      help="agents' HTTP port (each node listens on its own loopback address) [default 8700]")
    demo.add_argument("--work-dir", type=Path, default=Path("var/demo"), help="state and logs [default var/demo]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = ServerSettings.from_env(args=args)
        except ConfigError as exc:
            print(f"streammanager serve: {exc}", file=sys.stderr)
            return 2
        from streammanager.server import serve

        return serve(settings)
    if args.command == "controller":
        return run_controller(args)
    if args.command == "zookeeper":
        return run_zookeeper(args)
    if args.command == "demo":
        from streammanager.demo import run_demo

        return run_demo(args)
    return 2


def run_controller(args: argparse.Namespace) -> int:
    from streammanager import logs
    from streammanager.cloud import ProviderError, build_providers
    from streammanager.controller import Controller, ControllerError
    from streammanager.process import stop_event_on_signals

    try:
        settings = ControllerSettings.from_env(args=args)
        logs.configure(settings.log_level, settings.log_format)
        providers = build_providers(settings)
    except (ConfigError, ProviderError, ValueError, OSError) as exc:
        print(f"streammanager controller: {exc}", file=sys.stderr)
        return 2
    stop = stop_event_on_signals()
    if settings.metrics_bind != "off":
        from prometheus_client import start_http_server

        host, _, metrics_port = settings.metrics_bind.rpartition(":")
        try:
            start_http_server(int(metrics_port), addr=host)
        except OSError as exc:
            print(f"streammanager controller: SM_CONTROLLER_METRICS_BIND: cannot listen on {settings.metrics_bind}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        Controller(settings, providers).run(stop)
    except ControllerError as exc:
        print(f"streammanager controller: {exc}", file=sys.stderr)
        return 1
    return 0


def run_zookeeper(args: argparse.Namespace) -> int:
    from streammanager import logs
    from streammanager.zookeeper import (
        ZooKeeperConfig,
        ZooKeeperError,
        ZooKeeperServer,
        default_data_dir,
    )

    from streammanager.process import stop_event_on_signals

    logs.configure("INFO", "text")
    stop = stop_event_on_signals()
    server = ZooKeeperServer(ZooKeeperConfig(data_dir=args.data_dir or default_data_dir(), port=args.port,
                                             heap_mb=args.heap_mb, tick_ms=args.tick_ms))
    try:
        server.start()
    except ZooKeeperError as exc:
        server.stop()
        print(f"streammanager zookeeper: {exc}", file=sys.stderr)
        return 1
    print(f"zookeeper serving on {server.hosts} (pid {server.pid}); Ctrl-C stops it", flush=True)
    died = threading.Event()
    watcher = threading.Thread(target=lambda: (server.wait(), died.set(), stop.set()), daemon=True)
    watcher.start()
    stop.wait()
    if died.is_set():
        print(f"streammanager zookeeper: zookeeper exited by itself with code {server.wait()}", file=sys.stderr)
        return 1
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
