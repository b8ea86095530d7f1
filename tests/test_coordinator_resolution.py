"""x-resolution is {WIDTH}x{HEIGHT}-{FPS} with FPS rounded to an integer (docs/coordinator.md), probed
with the real ffprobe from a real HLS fragment made by ffmpeg."""
import subprocess
import threading

import pytest

from node_agent.artifacts import probe_resolution


@pytest.mark.parametrize("rate, expected", [("30000/1001", "320x180-30"), ("24000/1001", "320x180-24"),
                                            ("25", "320x180-25"), ("60000/1001", "320x180-60")])
def test_the_resolution_of_an_ntsc_rate_fragment_has_an_integer_fps(tmp_path, rate, expected):
    fragment = tmp_path / "frag.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=size=320x180:rate={rate}", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
                    "-f", "mpegts", str(fragment)], check=True, timeout=60)
    assert probe_resolution(fragment, threading.Event()) == expected
