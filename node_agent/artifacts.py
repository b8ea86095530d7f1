"""Media artifacts of an origin in the shared media directory (``SM_MEDIA_ROOT``), and the short
ffmpeg/ffprobe jobs that make them.

Layout under the media root::

    hls/<scope>/<name>/index.m3u8                    live HLS, written by nginx-rtmp (per channel); its
                                                    fragments are swept by the agent (``sweep_live_hls``)
    record/<scope>/<name>-<unix time>.flv           nginx-rtmp's recording of a session (transient)
    sessions/<scope>/<name>/<session>/vod/index.m3u8       the recording as a VOD playlist
    sessions/<scope>/<name>/<session>/preview/index.json   preview images' JSON index
    sessions/<scope>/<name>/<session>/preview/img-00001.jpg

Every ffmpeg here is a supervised child with a deadline, stopped (SIGINT, then SIGKILL) when the agent
stops.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from streammanager.models import StreamKey
from streammanager.process import Supervised

log = logging.getLogger(__name__)

_EXTINF_SEGMENT = re.compile(r"^#EXTINF:[^\n]*\n([^#\n][^\n]*)$", re.MULTILINE)


@dataclass(frozen=True)
class MediaLayout:
    root: Path  # absolute

    def hls_dir(self, scope: str) -> Path:
        return self.root / "hls" / scope

    def record_dir(self, scope: str) -> Path:
        return self.root / "record" / scope

    def live_playlist(self, key: StreamKey) -> Path:
        return self.hls_dir(key.scope) / key.name / "index.m3u8"

    def session_dir(self, key: StreamKey, session_id: str) -> Path:
        return self.root / "sessions" / key.scope / key.name / session_id

    def vod_playlist(self, key: StreamKey, session_id: str) -> Path:
        return self.session_dir(key, session_id) / "vod" / "index.m3u8"

    def preview_dir(self, key: StreamKey, session_id: str) -> Path:
        return self.session_dir(key, session_id) / "preview"

    def preview_index(self, key: StreamKey, session_id: str) -> Path:
        return self.preview_dir(key, session_id) / "index.json"

    def prepare(self, scopes: tuple[str, ...]) -> None:
        """Create the directories nginx writes into (it does not create parents)."""
        for scope in scopes:
            self.hls_dir(scope).mkdir(parents=True, exist_ok=True)
            self.record_dir(scope).mkdir(parents=True, exist_ok=True)


HLS_FRAGMENT_S = 2
HLS_PLAYLIST_S = 10


def sweep_live_hls(layout: MediaLayout, scopes: tuple[str, ...], published: set[StreamKey],
                   now: float | None = None, playlist_s: float = HLS_PLAYLIST_S) -> int:
    """nginx-rtmp's ``hls_cleanup``, done here: nginx runs it in its cache manager process, which a single
    process nginx (``master_process off``) never starts, so every fragment of every stream stayed on disk.
    As nginx-rtmp does: a fragment older than twice the playlist length is deleted (a player that read
    the playlist has had time to fetch it), a playlist older than the playlist length too (its stream
    ended), then the emptied stream directory. Fragments the playlist of a stream published here still
    lists are kept, and so are that stream's playlist and directory (nginx made it at the publish and
    writes into it). Returns how many files were deleted."""
    now = time.time() if now is None else now
    deleted = 0
    for scope in scopes:
        try:
            streams = [d for d in layout.hls_dir(scope).iterdir() if d.is_dir()]
        except OSError:
            continue
        for directory in streams:
            key = StreamKey(scope, directory.name)
            live = key in published
            keep = set(playlist_segments(directory / "index.m3u8")) if live else set()
            try:
                files = list(directory.iterdir())
            except OSError:
                continue
            for file in files:
                try:
                    age = now - file.stat().st_mtime
                except OSError:
                    continue
                if file.suffix == ".ts":
                    stale = age > 2 * playlist_s and file not in keep
                elif file.suffix == ".m3u8":
                    stale = age > playlist_s and not live
                else:
                    continue
                if stale:
                    file.unlink(missing_ok=True)
                    deleted += 1
            if not live:
                try:
                    # only if empty, and not just made: an origin sharing this media root may have made it
                    # for a publish this moment, its first fragment still to come
                    if now - directory.stat().st_mtime > playlist_s:
                        directory.rmdir()
                except OSError:
                    pass
    return deleted


def playlist_segments(playlist: Path) -> list[Path]:
    """The media segments a playlist lists, oldest first (empty if it is missing or unreadable)."""
    try:
        text = playlist.read_text()
    except OSError:
        return []
    return [playlist.parent / name.strip() for name in _EXTINF_SEGMENT.findall(text)]


def run_child(name: str, argv: list[str], stopping: threading.Event, timeout_s: float) -> int | None:
    """Run a short supervised child to its end; stop it when ``stopping`` is set or after ``timeout_s``.
    Returns its exit code (None if it was stopped)."""
    child = Supervised(name, argv, log_name="node_agent.artifacts", stop_signal=signal.SIGINT)
    try:
        child.start()
    except OSError as exc:
        log.warning("%s could not start: %s", name, exc)
        return None
    deadline = time.monotonic() + timeout_s
    while child.running:
        if stopping.is_set() or time.monotonic() > deadline:
            child.stop(3.0)
            return None
        stopping.wait(0.05)
    return child.stop(0)


def probe_resolution(media: Path, stopping: threading.Event) -> str | None:
    """``WIDTHxHEIGHT-FPS`` of the first video stream of ``media`` (ffprobe), None if unknown."""
    import subprocess

    try:
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
             "stream=width,height,avg_frame_rate,r_frame_rate", "-of", "json", str(media)],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        stream = json.loads(out.stdout or "{}").get("streams", [{}])[0]
        width, height = int(stream["width"]), int(stream["height"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        log.warning("could not probe %s: %s", media, exc)
        return None
    fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    if fps is None:  # never "1280x720-None": unknown until a later probe knows it
        log.warning("could not read the frame rate of %s", media)
        return None
    return f"{width}x{height}-{fps}"


def _rate(text: str | None) -> str | None:
    try:
        num, _, den = (text or "").partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    if value <= 0:
        return None
    return str(max(1, int(round(value))))  # docs/coordinator.md: FPS rounded to an integer (29.97 -> 30)


def snapshot(segment: Path, image: Path, stopping: threading.Event) -> bool:
    """Write the first video frame of ``segment`` (an HLS fragment starts with a keyframe) as a JPEG."""
    image.parent.mkdir(parents=True, exist_ok=True)
    partial = image.with_suffix(".part.jpg")
    code = run_child("preview", ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                                 "-i", str(segment), "-frames:v", "1", "-q:v", "4", str(partial)],
                     stopping, 15.0)
    if code != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        return False
    os.replace(partial, image)
    return True


def make_vod(recording: Path, playlist: Path, stopping: threading.Event, timeout_s: float = 600.0) -> bool:
    """Turn a recording into a VOD HLS playlist next to its segments (stream copy, no re-encoding)."""
    playlist.parent.mkdir(parents=True, exist_ok=True)
    code = run_child("vod", ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                             "-i", str(recording), "-c", "copy", "-f", "hls", "-hls_time", "4",
                             "-hls_list_size", "0", "-hls_playlist_type", "vod",
                             "-hls_segment_filename", str(playlist.parent / "seg-%05d.ts"), str(playlist)],
                     stopping, timeout_s)
    return code == 0 and playlist.exists()


def write_json_atomically(path: Path, doc: dict) -> None:
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(doc, indent=1))
    os.replace(partial, path)
