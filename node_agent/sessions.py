"""Publish sessions of an origin and the events the application is owed for each.

Contract, per session (one publish of one channel, ``session_id``):
- ``opened()`` writes the session's :class:`OpenSession` marker synchronously, before the publisher is
  allowed (it raises if ZooKeeper does not take it): from then on a stream-closed is owed, by this
  agent or, if it dies, by the controller's reaper.
- With a media server, a watcher thread per session queues ``stream-available`` once per type that
  really exists: ``HLS-LIVE`` when the live playlist is first written for this session,
  ``IMG-PREVIEW`` when the first preview image and its JSON index exist (then refreshed every
  ``preview_interval_s``), and after the end ``HLS-VOD`` once the recording became a VOD playlist.
- ``stream-closed`` is queued last; then the marker is deleted.
- Every event goes through one ordered outbox per session, written to ZooKeeper by one thread in
  order; a write that fails is retried on the next tick, so order holds and nothing is skipped.
- An origin's stop first drops its publishers and waits (bounded) for their sessions to end as above
  (``Agent._finish_sessions``, :meth:`wait_finished`). ``stop()`` then flushes what is ready (bounded)
  and stops every ffmpeg; sessions still open keep their marker, and the controller's reaper closes
  them once this agent's node record is gone.
"""
from __future__ import annotations

import collections
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.artifacts import (
    MediaLayout,
    make_vod,
    playlist_segments,
    probe_resolution,
    snapshot,
    write_json_atomically,
)
from streammanager.events import (
    STREAM_HLS_LIVE,
    STREAM_HLS_VOD,
    STREAM_IMG_PREVIEW,
    CallbackEvent,
    EventQueue,
    OpenSession,
)
from streammanager.models import StreamKey
from streammanager.registry import now_ms

log = logging.getLogger(__name__)

TICK_S = 0.25
RECORDING_WAIT_S = 5.0  # after the end, how long to wait for nginx's record_done
MAX_PREVIEW_IMAGES = 720  # the index keeps the newest this many


@dataclass
class _Session:
    key: StreamKey
    session_id: str
    clientid: str
    start_ms: int
    outbox: collections.deque = field(default_factory=collections.deque)
    ended: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # every event is in the outbox
    reaped: bool = False  # the controller closed it while this node was away: nothing more is sent
    recording: Path | None = None
    recording_known: threading.Event = field(default_factory=threading.Event)
    watcher: threading.Thread | None = None

    @property
    def channel(self) -> str:
        return str(self.key)

    def extra(self) -> dict:
        return {"scope": self.key.scope, "stream": self.key.name}


class SessionTracker:
    def __init__(self, queue: EventQueue, node_id: str, node_started_ms: int, *,
                 layout: MediaLayout | None = None, preview_interval_s: float = 5.0,
                 open_timeout_s: float = 2.0):
        self._queue = queue
        self._node_id = node_id
        self._node_started_ms = node_started_ms
        self._layout = layout
        self._preview_interval_s = preview_interval_s
        self._open_timeout_s = open_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._abandoned: list[tuple[str, str]] = []  # (channel, session) of refused publishes' markers
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sessions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- from the hooks ------------------------------------------------------------------------------
    def opened(self, key: StreamKey, session_id: str, clientid: str, start_ms: int) -> None:
        """Record that a stream-closed is owed. Raises (a kazoo error or timeout) if ZooKeeper did not
        take the marker within ``open_timeout_s``: the caller refuses the publisher."""
        marker = OpenSession(str(key), session_id, self._node_id, self._node_started_ms, start_ms)
        try:
            self._queue.open_session(marker, timeout_s=self._open_timeout_s)
        except Exception:
            with self._lock:  # it may have been written all the same: delete it when ZooKeeper answers
                self._abandoned.append((str(key), session_id))
            raise
        session = _Session(key, session_id, clientid, start_ms)
        with self._lock:
            self._sessions[session_id] = session
        if self._layout is not None:
            session.watcher = threading.Thread(target=self._watch_media, args=(session,),
                                               name=f"session-{key.name}"[:15], daemon=True)
            session.watcher.start()

    def ended(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            return
        session.ended.set()
        if self._layout is None:  # no media: nothing more to wait for
            session.outbox.append(CallbackEvent.closed(session.channel, session_id, self._node_id))
            session.finished = True
        self._wake.set()

    def discard(self, session_id: str) -> None:
        """A publish undone before it was allowed (its publisher left meanwhile): forget its session
        without an event, and delete its marker. A session that has ended already is left to end as usual."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.ended.is_set():
                return
            del self._sessions[session_id]
            self._abandoned.append((session.channel, session_id))
        session.reaped = True  # its media watcher stops without a VOD or an event
        session.ended.set()
        self._wake.set()

    def forget_reaped(self) -> list[str]:
        """The open sessions that the controller's reaper closed while this node was away (frozen past
        its ZooKeeper session: the application got their stream-closed): forgotten here, with whatever
        their outbox still held, so that nothing more is sent for them. Returns their session ids (the
        caller drops their publishers). Raises kazoo's errors."""
        with self._lock:
            open_now = [(s.channel, s.session_id) for s in self._sessions.values() if not s.finished]
        if not open_now:
            return []
        reaped = self._queue.reaped(open_now)
        for channel, session_id in reaped:
            with self._lock:
                session = self._sessions.pop(session_id, None)
            if session is not None:
                session.reaped = True
                session.ended.set()  # its media watcher stops, without making a VOD nobody is told of
                session.outbox.clear()
            self._queue.forget_reaped(channel, session_id)
        return [session_id for _, session_id in reaped]

    def recorded(self, key: StreamKey, clientid: str, path: str) -> None:
        """nginx-rtmp finished a recording of ``key`` by ``clientid`` (its ``record_done``)."""
        if self._layout is None:
            return
        file = _recording_of(self._layout, key, path)
        if file is None:
            log.warning("ignoring a recording that is not one of %s in the media root: %r", key, path[:200])
        with self._lock:
            matches = [s for s in self._sessions.values() if s.key == key and s.clientid == clientid
                       and (not s.recording_known.is_set() or s.recording is None)]  # or only a refused one
        if matches:
            session = min(matches, key=lambda s: s.start_ms)
            # refused (None): no other record_done is coming for this publisher; the end looks for the
            # stream's own newest recording at once instead of waiting RECORDING_WAIT_S for it
            session.recording = file
            session.recording_known.set()

    # -- the outbox writer ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Write every ready event in order; delete the markers of finished sessions. Returns whether
        everything was written."""
        if not self._queue.connected:
            return False  # the next tick after the connection is back
        with self._lock:
            sessions = list(self._sessions.values())
            abandoned = list(self._abandoned)
        done = True
        for channel, session_id in abandoned:
            try:
                self._queue.close_session(channel, session_id)
                with self._lock:
                    self._abandoned.remove((channel, session_id))
            except Exception as exc:
                done = False
                log.warning("could not remove the marker of a refused publish (retrying): %s", exc)
        for session in sessions:
            finished = session.finished  # read first: it is set after the last event is in the outbox
            try:
                while session.outbox:
                    self._queue.enqueue(session.outbox[0])
                    event = session.outbox.popleft()
                    log.info("queued %s for session %s", " ".join(filter(None, (event.event_type, event.stream_type))),
                             session.session_id, extra={**session.extra(), "action": event.event_type})
                if finished:
                    self._queue.close_session(session.channel, session.session_id)
                    with self._lock:
                        self._sessions.pop(session.session_id, None)
            except Exception as exc:  # kazoo's errors and timeouts (not all are KazooException)
                done = False
                log.warning("could not queue events (retrying): %s", exc, extra=session.extra())
        return done

    def wait_finished(self, timeout_s: float) -> bool:
        """Wait until every session has ended and its events are written; False if some are still
        open after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self._sessions:
                    return True
            if time.monotonic() >= deadline or self._stopping.wait(0.1):
                return False

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)  # a write in progress on an unreachable ZooKeeper is not waited for
        with self._lock:
            watchers = [s.watcher for s in self._sessions.values() if s.watcher is not None]
        deadline = time.monotonic() + 5.0
        for watcher in watchers:  # they see the stop within a tick; their ffmpeg children are stopped
            watcher.join(max(0.0, deadline - time.monotonic()))
        if not self._queue.connected:
            return  # never block a stop on an unreachable ZooKeeper: the reaper owes the rest
        deadline = time.monotonic() + flush_timeout_s
        while not self.flush() and time.monotonic() < deadline and self._queue.connected:
            time.sleep(0.1)

    # -- media artifacts of one session --------------------------------------------------------------
    def _watch_media(self, session: _Session) -> None:
        try:
            self._watch_live(session)
            if self._stopping.is_set() or session.reaped:
                return
            self._finish(session)
        except Exception:
            log.exception("session artifacts failed", extra=session.extra())
            if not self._stopping.is_set():
                session.outbox.append(CallbackEvent.closed(session.channel, session.session_id, self._node_id))
                session.finished = True
        self._wake.set()

    def _watch_live(self, session: _Session) -> None:
        layout = self._layout
        assert layout is not None
        playlist = layout.live_playlist(session.key)
        started_s = session.start_ms / 1000.0
        resolution: str | None = None
        live_sent = False
        preview_sent = False
        next_preview = 0.0
        images: list[dict] = []
        while not session.ended.is_set() and not self._stopping.is_set():
            segments = [s for s in playlist_segments(playlist) if _written_since(s, started_s)]
            if segments and _written_since(playlist, started_s):
                if resolution is None:
                    resolution = probe_resolution(segments[0], self._stopping)
                if not live_sent and resolution is not None:
                    session.outbox.append(CallbackEvent.available(
                        session.channel, session.session_id, STREAM_HLS_LIVE, resolution, str(playlist),
                        self._node_id))
                    live_sent = True
                    self._wake.set()
                if time.monotonic() >= next_preview and resolution is not None:
                    next_preview = time.monotonic() + self._preview_interval_s
                    if self._take_preview(session, segments[-1], images, resolution) and not preview_sent:
                        session.outbox.append(CallbackEvent.available(
                            session.channel, session.session_id, STREAM_IMG_PREVIEW, resolution,
                            str(layout.preview_index(session.key, session.session_id)), self._node_id))
                        preview_sent = True
                        self._wake.set()
            session.ended.wait(0.5)

    def _take_preview(self, session: _Session, segment: Path, images: list[dict], resolution: str) -> bool:
        layout = self._layout
        assert layout is not None
        number = (images[-1]["number"] + 1) if images else 1
        name = f"img-{number:05d}.jpg"
        directory = layout.preview_dir(session.key, session.session_id)
        if not snapshot(segment, directory / name, self._stopping):
            return False
        images.append({"number": number, "file": name, "timeMs": now_ms()})
        while len(images) > MAX_PREVIEW_IMAGES:
            (directory / images.pop(0)["file"]).unlink(missing_ok=True)
        write_json_atomically(layout.preview_index(session.key, session.session_id), {
            "channel": session.channel, "streamingId": session.session_id, "resolution": resolution,
            "intervalSeconds": self._preview_interval_s, "updatedMs": now_ms(),
            "images": [{"file": i["file"], "path": str(directory / i["file"]), "timeMs": i["timeMs"]}
                       for i in images]})
        return True

    def _finish(self, session: _Session) -> None:
        """After the end: the recording becomes a VOD playlist (HLS-VOD), then stream-closed."""
        layout = self._layout
        assert layout is not None
        waited = 0.0
        while not session.recording_known.wait(0.1) and waited < RECORDING_WAIT_S:
            if self._stopping.is_set():
                return
            waited += 0.1
        if session.recording is None:  # no record_done, or a refused one
            session.recording = _newest_recording(layout, session)
        recording = session.recording
        if recording is not None and recording.exists() and recording.stat().st_size > 0:
            playlist = layout.vod_playlist(session.key, session.session_id)
            if make_vod(recording, playlist, self._stopping):
                segments = playlist_segments(playlist)
                resolution = probe_resolution(segments[0], self._stopping) if segments else None
                if resolution is not None:
                    session.outbox.append(CallbackEvent.available(
                        session.channel, session.session_id, STREAM_HLS_VOD, resolution, str(playlist),
                        self._node_id))
                recording.unlink(missing_ok=True)
            elif self._stopping.is_set():
                return
            else:
                log.warning("could not turn the recording %s into a VOD playlist", recording, extra=session.extra())
        else:
            log.info("no recording of the session (too short?): no HLS-VOD", extra=session.extra())
            if recording is not None:
                recording.unlink(missing_ok=True)
        session.outbox.append(CallbackEvent.closed(session.channel, session.session_id, self._node_id))
        session.finished = True


def _recording_of(layout: MediaLayout, key: StreamKey, path: str) -> Path | None:
    """``path`` as a recording of ``key``: ``<name>-<unix time>.flv`` (``record_unique on``) directly in its
    scope's record directory, after resolving ``..`` and symbolic links (``Path.parents`` is lexical: a
    path through ``record/<scope>/../../..`` passed as inside it, and the file it named was turned into
    the session's VOD and then deleted). None if it is anything else."""
    if not path or "\0" in path or not Path(path).is_absolute():
        return None
    directory = layout.record_dir(key.scope).resolve()
    file = Path(path).resolve()
    if file.parent != directory or not re.fullmatch(re.escape(key.name) + r"-[0-9]+\.flv", file.name):
        return None
    return file


def _written_since(path: Path, since_s: float) -> bool:
    try:
        return path.stat().st_mtime >= since_s
    except OSError:
        return False


def _newest_recording(layout: MediaLayout, session: _Session) -> Path | None:
    """Without a record_done hook: the newest recording of the stream written during the session (its own:
    ``show-*.flv`` also matches stream show-other's)."""
    own = re.compile(re.escape(session.key.name) + r"-[0-9]+\.flv")
    candidates = [p for p in layout.record_dir(session.key.scope).glob(f"{session.key.name}-*.flv")
                  if own.fullmatch(p.name) and _written_since(p, session.start_ms / 1000.0)]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
