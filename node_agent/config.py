"""Agent settings: every option is an ``AGENT_`` environment variable and a command-line flag."""
from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping

from streammanager.config import ConfigError, Option, port, positive, redacted_repr, resolve, zk_auth_option
from streammanager.coordinator_config import (
    KEY_VERIFICATION_OPTIONS,
    MEDIA_OPTIONS,
    CallbackTarget,
    key_verification_from,
    media_from,
)
from streammanager.models import ROLES, RecordError, validate_name


def address(text: str) -> str:
    ipaddress.ip_address(text)
    return text


def networks(text: str) -> tuple[str, ...]:
    """A comma-separated list of addresses or networks (``10.0.0.7,10.1.0.0/16``), each validated."""
    return tuple(str(ipaddress.ip_network(part.strip(), strict=False)) for part in text.split(",") if part.strip())


AGENT_OPTIONS: tuple[Option, ...] = (
    Option("role", "AGENT_ROLE", None, "origin or edge (required)", str.lower, ROLES),
    Option("region", "AGENT_REGION", None, "the node's region, e.g. us-east-1 (required)"),
    Option("group", "AGENT_GROUP", "default", "node group"),
    Option("host", "AGENT_HOST", "127.0.0.1", "address clients reach the media server on (serverAddress)",
           address),
    Option("http_port", "AGENT_HTTP_PORT", 8090, "port of the agent's hook endpoints", port),
    Option("advertise_host", "AGENT_ADVERTISE_HOST", None,
           "the address clients are told (serverAddress) when it is not --host, e.g. a cloud VM's public IP, "
           "which is not on any interface; other nodes still relay from --host", address),
    Option("http_host", "AGENT_HTTP_HOST", None, "address of the hook endpoints (default: --host)", address),
    Option("hook_clients", "AGENT_HOOK_CLIENTS", (),
           "addresses or networks (comma-separated) besides this node's own that may call the hook "
           "endpoints, e.g. an SRS on another host; by default only the media server on this host may",
           networks),
    Option("rtmp_port", "AGENT_RTMP_PORT", 1935, "RTMP port of the media server", port),
    Option("capacity", "AGENT_CAPACITY", None,
           "capacity: publishers on an origin (default 50), viewers on an edge (default 200)", positive(int)),
    Option("media", "AGENT_MEDIA", "nginx", "media server to run; none simulates a node", str.lower,
           ("nginx", "none")),
    Option("relay", "AGENT_RELAY", "ffmpeg",
           "how an edge pulls a stream from its origin: ffmpeg (one supervised relay per stream) or "
           "nginx (experimental, for comparison only: nginx-rtmp's own pull, started by answering on_play "
           "with the origin's URL; it ends when the player that started it leaves)", str.lower,
           ("ffmpeg", "nginx")),
    Option("node_id", "AGENT_NODE_ID", None, "node id (default: ROLE-HOST-HTTPPORT)"),
    Option("zk_hosts", "AGENT_ZK_HOSTS", "127.0.0.1:2181", "ZooKeeper connection string"),
    Option("zk_root", "AGENT_ZK_ROOT", "/streammanager", "root znode of the cluster"),
    Option("zk_timeout_s", "AGENT_ZK_TIMEOUT_S", 4.0, "ZooKeeper session timeout, seconds", positive(float)),
    zk_auth_option("AGENT_ZK_AUTH"),
    Option("report_interval_s", "AGENT_REPORT_INTERVAL_S", 1.0,
           "a change is reported at once, then at most once per this many seconds", positive(float)),
    Option("heartbeat_interval_s", "AGENT_HEARTBEAT_INTERVAL_S", 60.0,
           "an unchanged record is rewritten this often (a backstop: liveness is the ZooKeeper session, and "
           "an agent whose report loop stalls fences itself, see --stall-timeout-s)", positive(float)),
    Option("stall_timeout_s", "AGENT_STALL_TIMEOUT_S", 15.0,
           "an agent whose report loop has not run for this long closes its session (its node leaves every "
           "answer) and exits, for its supervisor to restart it", positive(float)),
    Option("viewer_wait_s", "AGENT_VIEWER_WAIT_S", 60.0,
           "an edge drops the viewers of a stream that has been live nowhere for this long (its publisher "
           "stopped and did not come back); until then they wait for it", positive(float)),
    Option("max_record_bytes", "AGENT_MAX_RECORD_BYTES", 1_000_000,
           "the largest node record the agent writes: ZooKeeper drops the connection of a request over its "
           "jute.maxbuffer (1 MiB unless raised on every server and client); from 90 %% of it on, the node "
           "takes no new stream", positive(int)),
    Option("hls_fragment_s", "AGENT_HLS_FRAGMENT_S", 2.0,
           "an origin's live HLS fragment length, seconds (nginx cuts at the next keyframe after it)",
           positive(float)),
    Option("hls_playlist_s", "AGENT_HLS_PLAYLIST_S", 10.0,
           "how much of the stream an origin's live HLS playlist lists, seconds (at least one fragment); a "
           "fragment stays on disk twice this long, then the agent deletes it", positive(float)),
    Option("work_dir", "AGENT_WORK_DIR", None, "directory for the agent's files (default: a temp dir)"),
    Option("log_level", "AGENT_LOG_LEVEL", "INFO", "log level", str.upper, ("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_format", "AGENT_LOG_FORMAT", "json", "log format", str.lower, ("json", "text")),
)

DEFAULT_CAPACITY = {"origin": 50, "edge": 200}
# the coordinator's options an agent takes besides its own (same flags, the specification's variables)
AGENT_COORDINATOR_OPTIONS: tuple[Option, ...] = KEY_VERIFICATION_OPTIONS + MEDIA_OPTIONS


@dataclass(frozen=True)
class AgentSettings:
    role: str
    region: str
    group: str = "default"
    host: str = "127.0.0.1"
    http_port: int = 8090
    http_host: str = "127.0.0.1"
    advertise_host: str | None = None
    hook_clients: tuple[str, ...] = ()  # networks besides this node's own addresses allowed to call hooks
    rtmp_port: int = 1935
    capacity: int = 50
    media: str = "nginx"
    relay: str = "ffmpeg"
    node_id: str = ""
    zk_hosts: str = "127.0.0.1:2181"
    zk_root: str = "/streammanager"
    zk_timeout_s: float = 4.0
    zk_auth: str | None = None  # digest USER:PASSWORD
    report_interval_s: float = 1.0
    heartbeat_interval_s: float = 60.0
    stall_timeout_s: float = 15.0
    viewer_wait_s: float = 60.0
    max_record_bytes: int = 1_000_000  # ZooKeeper's default jute.maxbuffer is 1 MiB, request included
    hls_fragment_s: float = 2.0
    hls_playlist_s: float = 10.0
    work_dir: str | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    # the coordinator contract (streammanager.coordinator_config): KEY_VERIFICATION_*, SM_MEDIA_ROOT
    key_verification: CallbackTarget = CallbackTarget()
    media_root: str | None = None  # None: media/ in the work directory
    preview_interval_s: float = 5.0

    def __repr__(self) -> str:  # never the ZooKeeper password
        return redacted_repr(self, AGENT_OPTIONS)

    @property
    def agent_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None
                 ) -> "AgentSettings":
        env = os.environ if env is None else env
        values = resolve(AGENT_OPTIONS, args or argparse.Namespace(), env)
        values["key_verification"] = key_verification_from(args, env)
        media = media_from(args, env)
        values["media_root"], values["preview_interval_s"] = media.media_root, media.preview_interval_s
        if not values["role"]:
            raise ConfigError("--role (AGENT_ROLE) is required: origin or edge")
        if not values["region"]:
            raise ConfigError("--region (AGENT_REGION) is required")
        values["http_host"] = values["http_host"] or values["host"]
        values["capacity"] = values["capacity"] or DEFAULT_CAPACITY[values["role"]]
        values["node_id"] = values["node_id"] or f"{values['role']}-{values['host']}-{values['http_port']}"
        if values["hls_playlist_s"] < values["hls_fragment_s"]:
            raise ConfigError(f"--hls-playlist-s (AGENT_HLS_PLAYLIST_S, {values['hls_playlist_s']:g}) must be at "
                              f"least --hls-fragment-s (AGENT_HLS_FRAGMENT_S, {values['hls_fragment_s']:g})")
        for kind in ("region", "group", "node_id"):
            try:
                validate_name(kind, values[kind])
            except RecordError as exc:
                raise ConfigError(str(exc)) from None
        return cls(**values)
