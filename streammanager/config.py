"""Configuration: every setting is an environment variable and a command-line option.

Parsed once into a frozen, validated settings object; nothing else reads ``os.environ``. Bad values
fail at start-up with a message naming the variable.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Option:
    field: str  # settings attribute
    env: str  # environment variable
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be positive, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        shown = ("unset" if opt.default is None else "(hidden)") if opt.secret else opt.default
        parser.add_argument(
            opt.flag, dest=opt.field, default=None, choices=opt.choices,
            help=f"{opt.help} [env {opt.env}, default {shown!s}]",
        )


def resolve(options: Sequence[Option], args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """Command line over environment over default; each value converted and validated."""
    values: dict[str, Any] = {}
    for opt in options:
        raw = getattr(args, opt.field, None)
        source = opt.flag
        if raw is None:
            raw = env.get(opt.env)
            source = opt.env
        if raw is None or raw == "":
            values[opt.field] = opt.default
            continue
        try:
            value = opt.type(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: bad value {raw if not opt.secret else '(hidden)'!r}: {exc}") from None
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{source}: must be one of {', '.join(opt.choices)}")
        values[opt.field] = value
    return values


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return text


SERVER_OPTIONS: tuple[Option, ...] = (
    Option("zk_hosts", "SM_ZK_HOSTS", "127.0.0.1:2181", "ZooKeeper connection string (host:port,...)"),
    Option("zk_root", "SM_ZK_ROOT", "/streammanager", "root znode of this cluster"),
    Option("zk_timeout_s", "SM_ZK_TIMEOUT_S", 4.0, "ZooKeeper session timeout, seconds", positive(float)),
    Option("access_token", "SM_ACCESS_TOKEN", None, "admin access token; unset refuses every admin call",
           secret=True),
    Option("bind", "SM_BIND", "127.0.0.1:5080", "address the API server listens on", host_port),
    Option("workers", "SM_WORKERS", 2, "gunicorn worker processes", positive(int)),
    Option("threads", "SM_THREADS", 4, "threads per worker", positive(int)),
    Option("heartbeat_max_age_s", "SM_HEARTBEAT_MAX_AGE_S", 15.0,
           "a node whose last load report is older is not chosen", positive(float)),
    Option("reservation_ttl_s", "SM_RESERVATION_TTL_S", 30.0,
           "how long a broadcast lookup holds its origin for a stream that is not live yet", positive(float)),
    Option("assignment_ttl_s", "SM_ASSIGNMENT_TTL_S", 3.0,
           "how long an answer counts against its node before load reports include it", positive(float)),
    Option("best_few", "SM_BEST_FEW", 2, "random pick among this many best-weighted nodes", positive(int)),
    Option("log_level", "SM_LOG_LEVEL", "INFO", "log level", str.upper,
           ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_format", "SM_LOG_FORMAT", "json", "log format", str.lower, ("json", "text")),
)


@dataclass(frozen=True)
class ServerSettings:
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/streammanager"
    zk_timeout_s: float = 4.0
    access_token: str | None = None
    bind: str = "127.0.0.1:5080"
    workers: int = 2
    threads: int = 4
    heartbeat_max_age_s: float = 15.0
    reservation_ttl_s: float = 30.0
    assignment_ttl_s: float = 3.0
    best_few: int = 2
    log_level: str = "INFO"
    log_format: str = "json"

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["access_token"] = "(set)" if self.access_token else None
        return f"ServerSettings({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None
                 ) -> "ServerSettings":
        return cls(**resolve(SERVER_OPTIONS, args or argparse.Namespace(),
                             os.environ if env is None else env))
