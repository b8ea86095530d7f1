"""A session's recording (nginx-rtmp's record_done ``path``) must be a recording of that stream in the
media root: the agent turns it into the session's VOD and then deletes it."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from node_agent.artifacts import MediaLayout
from node_agent.sessions import SessionTracker
from streammanager.events import CallbackEvent, EventQueue
from streammanager.models import StreamKey
from streammanager.registry import ZkPaths, now_ms
from tests.conftest import wait_until

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")


def _flv(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=10", "-t", "2", "-c:v", "libx264", "-g", "10", "-f", "flv",
                    str(path)], check=True, timeout=60)
    return path


def _events(zk, paths: ZkPaths, channel: str) -> list[CallbackEvent]:
    parent = paths.callback_channel(channel)
    if not zk.exists(parent):
        return []
    return [CallbackEvent.from_json(zk.get(f"{parent}/{child}")[0]) for child in sorted(zk.get_children(parent))]


def _session(zk, zk_root, tmp_path, recording_path, during=lambda layout: None):
    """Run one session of live/show whose record_done names ``recording_path`` (or several, in order;
    ``during`` runs while it is live); its events."""
    paths = ZkPaths(zk_root)
    layout = MediaLayout((tmp_path / "media").resolve())
    layout.prepare(("live",))
    tracker = SessionTracker(EventQueue(zk, paths), "origin-t", now_ms(), layout=layout)
    tracker.start()
    key = StreamKey("live", "show")
    try:
        tracker.opened(key, "session-1", "7", now_ms())
        during(layout)
        named = recording_path(layout)
        for path in [named] if isinstance(named, str) else named:  # one record_done each
            tracker.recorded(key, "7", path)
        tracker.ended("session-1")
        return wait_until(lambda: [e for e in _events(zk, paths, "live/show")]
                          if any(e.event_type == "stream-closed" for e in _events(zk, paths, "live/show")) else None,
                          60, what="the session's stream-closed")
    finally:
        tracker.stop()


def test_a_record_done_path_out_of_the_media_root_is_ignored(zk, zk_root, tmp_path):
    precious = _flv(tmp_path / "elsewhere" / "precious.flv")
    events = _session(zk, zk_root, tmp_path,
                      lambda layout: f"{layout.record_dir('live')}/../../../elsewhere/precious.flv")
    assert precious.exists(), "a file outside the media root was made the session's VOD and deleted"
    assert [e.stream_type for e in events if e.event_type == "stream-available"] == []


def test_another_streams_recording_is_not_taken(zk, zk_root, tmp_path):
    other = _flv(tmp_path / "media" / "record" / "live" / "show-other-1700000000.flv")
    _session(zk, zk_root, tmp_path, lambda layout: str(other))
    assert other.exists()


def test_the_streams_own_recording_becomes_its_vod(zk, zk_root, tmp_path):
    own = _flv(tmp_path / "media" / "record" / "live" / "show-1700000000.flv")
    events = _session(zk, zk_root, tmp_path, lambda layout: str(own))
    vod = [e for e in events if e.stream_type == "HLS-VOD"]
    assert len(vod) == 1 and vod[0].index_file.endswith("/sessions/live/show/session-1/vod/index.m3u8")
    assert not own.exists()  # turned into the VOD


def test_a_refused_record_done_falls_back_to_the_streams_own_recording_never_a_like_named_streams(
        zk, zk_root, tmp_path):
    def record_both(layout):  # live/show and live/show-other both recorded during the session
        _flv(layout.record_dir("live") / "show-1700000001.flv")
        _flv(layout.record_dir("live") / "show-other-1700000002.flv")  # the newest

    events = _session(zk, zk_root, tmp_path, lambda layout: "/nowhere/show-1.flv", during=record_both)
    vod = [e for e in events if e.stream_type == "HLS-VOD"]
    assert len(vod) == 1 and vod[0].index_file.endswith("/sessions/live/show/session-1/vod/index.m3u8")
    record = tmp_path / "media" / "record" / "live"
    assert (record / "show-other-1700000002.flv").exists()  # ``show-*.flv`` matched it: it was taken
    assert not (record / "show-1700000001.flv").exists()  # the stream's own became the VOD


def test_a_valid_record_done_after_a_refused_one_is_still_taken(zk, zk_root, tmp_path):
    own = _flv(tmp_path / "media" / "record" / "live" / "show-1700000003.flv")
    events = _session(zk, zk_root, tmp_path, lambda layout: ["/nowhere/show-1.flv", str(own)])
    assert [e.stream_type for e in events if e.stream_type == "HLS-VOD"] == ["HLS-VOD"]
    assert not own.exists()  # written before the session began: only its record_done names it
