"""Edge relays: one ffmpeg per stream, pulling from the stream's origin into this edge's nginx.

Contract: ``ensure(key)`` on every play (idempotent: one relay per stream however many players);
``release(key)`` when the last player leaves, which stops the relay after a grace period unless a
player comes back. A relay that exits while players remain is restarted with backoff from the same
origin, but at once from a new one: its origin is looked up every half second meanwhile, so it
follows a stream republished on another origin without waiting out a backoff; when the stream is no
longer live anywhere, it is not restarted. ``stop_all()`` stops every ffmpeg: SIGINT, then SIGKILL.
"""
from __future__ import annotations

import hmac
import logging
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from streammanager.models import StreamKey
from streammanager.process import Supervised

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 3.0
NOT_LIVE_RETRY_S = 0.5
RUNNING_RESETS_BACKOFF_S = 10.0  # a relay that ran this long starts its back-off afresh
_RELAYKEY = re.compile(r"(relaykey=)[0-9A-Za-z_-]*")


def redact_relay_key(line: str) -> str:
    """ffmpeg names its output URL in its errors ("Error writing trailer of rtmp://...?relaykey=..."):
    a relay's key, with which anyone may publish that stream on this edge until it is used, must not
    reach the log."""
    return _RELAYKEY.sub(r"\1(hidden)", line)


class RelayKeys:
    """One-use keys for our relays' publishes into this edge's nginx (an edge accepts no other publisher).

    A relay's ffmpeg carries its key in its output URL, so in its argv, which any local user reads with
    ``ps``: one key for the whole agent let anyone on the machine publish under any stream's name for as
    long as the agent ran. Each start of a relay now gets its own key, good for one publish of that
    stream within ``TTL_S``: read from ``ps`` once the relay has published, it opens nothing.
    """

    TTL_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: dict[str, list[tuple[str, float]]] = {}  # stream -> (key, expiry), unused

    def issue(self, key: StreamKey) -> str:
        token = secrets.token_urlsafe(18)
        now = time.monotonic()
        with self._lock:
            # forget every expired key, not only this stream's: a relay that never published (its origin
            # went) left its key behind for good, one per stream name
            for stream in [s for s, keys in self._issued.items() if all(until <= now for _, until in keys)]:
                del self._issued[stream]
            live = [(t, until) for t, until in self._issued.get(str(key), ()) if until > now]
            self._issued[str(key)] = live + [(token, now + self.TTL_S)]
        return token

    def redeem(self, key: StreamKey, given: str) -> bool:
        """Whether ``given`` is an unused, unexpired key of ``key``'s relay; it is used up if so."""
        if not given:
            return False
        now = time.monotonic()
        with self._lock:
            issued = self._issued.get(str(key), [])
            match = None
            for entry in issued:  # compared in constant time, every one
                if hmac.compare_digest(entry[0].encode(), given.encode()) and entry[1] > now:
                    match = entry
            if match is None:
                return False
            issued.remove(match)
            if not issued:
                del self._issued[str(key)]
            return True


@dataclass
class _Relay:
    key: StreamKey
    proc: Supervised | None = None
    origin: str | None = None
    stop_at: float | None = None  # monotonic deadline once no player is left
    next_start: float = 0.0
    backoff_s: float = 1.0
    starts: int = 0
    started_at: float = 0.0
    next_lookup: float = 0.0  # while backing off, the origin is looked up again at this pace
    failed_origin: str | None = None  # the origin of the last relay that exited


class RelayManager:
    def __init__(self, *, edge_host: str, rtmp_port: int, node_id: str, relay_keys: RelayKeys,
                 resolve_origin: Callable[[StreamKey], str | None], grace_s: float = 5.0,
                 on_failure: Callable[[StreamKey, str], None] | None = None):
        self._edge = f"{edge_host}:{rtmp_port}"
        self._node_id = node_id
        self._keys = relay_keys
        self._resolve_origin = resolve_origin
        self._on_failure = on_failure  # told when a relay exits: (stream, origin host:port)
        self._grace_s = grace_s
        self._relays: dict[str, _Relay] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="relays", daemon=True)
        if shutil.which("ffmpeg") is None:
            raise RuntimeError("ffmpeg is not installed: apt-get install ffmpeg (or 'make setup')")

    def start(self) -> None:
        self._thread.start()

    def running(self) -> int:
        """How many relays have a running ffmpeg."""
        with self._lock:
            return sum(1 for relay in self._relays.values() if relay.proc is not None and relay.proc.running)

    def ensure(self, key: StreamKey) -> None:
        with self._lock:
            relay = self._relays.setdefault(str(key), _Relay(key))
            relay.stop_at = None
        self._wake.set()

    def release(self, key: StreamKey) -> None:
        with self._lock:
            relay = self._relays.get(str(key))
            if relay is not None and relay.stop_at is None:
                relay.stop_at = time.monotonic() + self._grace_s
        self._wake.set()

    def _argv(self, key: StreamKey, origin: str) -> list[str]:
        return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning", "-rw_timeout", "5000000",
                "-fpsprobesize", "0",  # a copy needs no frame rate: do not read 20 frames to guess it
                "-i", f"rtmp://{origin}/{key.scope}/{key.name}?relay={self._node_id}",
                "-c", "copy", "-f", "flv",
                f"rtmp://{self._edge}/{key.scope}/{key.name}?relaykey={self._keys.issue(key)}"]

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                relays = list(self._relays.values())
            for relay in relays:
                try:
                    self._tend(relay, now)
                except Exception:
                    log.exception("relay supervision failed", extra={"stream": str(relay.key)})

    def _tend(self, relay: _Relay, now: float) -> None:
        running = relay.proc is not None and relay.proc.running
        if running and relay.started_at and now - relay.started_at > RUNNING_RESETS_BACKOFF_S:
            relay.backoff_s = 1.0
        if relay.stop_at is not None and now >= relay.stop_at:
            if relay.proc is not None:
                relay.proc.stop(STOP_TIMEOUT_S)
            with self._lock:
                if self._relays.get(str(relay.key)) is relay and relay.stop_at is not None:
                    del self._relays[str(relay.key)]
            log.info("relay stopped: no player left", extra={"scope": relay.key.scope, "stream": relay.key.name})
            return
        if running:
            return
        if relay.proc is not None:  # it ran and exited
            log.info("relay exited with %s", relay.proc.returncode,
                     extra={"scope": relay.key.scope, "stream": relay.key.name})
            if self._on_failure is not None and relay.origin is not None:
                self._on_failure(relay.key, relay.origin)
            relay.proc = None
            relay.failed_origin = relay.origin
        if now < relay.next_start and now < relay.next_lookup:
            return
        origin = self._resolve_origin(relay.key)
        relay.next_lookup = now + NOT_LIVE_RETRY_S
        if origin is None:  # not live anywhere now: players wait; look again soon (a registry read)
            relay.next_start = max(relay.next_start, now + NOT_LIVE_RETRY_S)
            return
        if now < relay.next_start and origin == relay.failed_origin:
            return  # the same origin that just failed: back off (a stream republished elsewhere does not wait)
        relay.proc = Supervised(f"relay-{relay.key.name}", self._argv(relay.key, origin),
                                log_name="node_agent.relay", stop_signal=signal.SIGINT,
                                redact=redact_relay_key)
        relay.proc.start()
        relay.origin = origin
        relay.starts += 1
        relay.started_at = now
        relay.next_start = now + relay.backoff_s  # a relay that dies at once is not restarted in a loop
        relay.backoff_s = min(relay.backoff_s * 2, 8.0) if relay.starts > 1 else relay.backoff_s
        log.info("relay started from %s", origin, extra={"scope": relay.key.scope, "stream": relay.key.name})

    def stop_all(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)
        with self._lock:
            relays = list(self._relays.values())
            self._relays.clear()
        for relay in relays:
            if relay.proc is not None:
                relay.proc.stop(STOP_TIMEOUT_S)
