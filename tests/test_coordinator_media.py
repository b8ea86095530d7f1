"""Real video: an origin (agent + nginx-rtmp) writes live HLS, preview images and a VOD of each
session into the media root, announces each with stream-available to a real receiver of ours, then
stream-closed; the close command drops a real ffmpeg publisher."""
import json
import re
import signal
import threading

import pytest

from streammanager.callbacks import CallbackDispatcher
from streammanager.coordinator_config import CallbackTarget, EventCallbackSettings
from streammanager.models import StreamKey, StreamRecord
from streammanager.registry import ZkPaths
from tests.conftest import wait_for_nodes, wait_until
from tests.coordinator_helpers import Receiver, event_tuple
from tests.test_media_e2e import PUBLISH

P = "/streammanager/api/2.0"


@pytest.fixture
def receiver(zk, zk_root):
    """The application's event endpoint, fed by a dispatcher as a controller leader runs it."""
    server = Receiver()
    stop = threading.Event()
    dispatcher = CallbackDispatcher(zk, ZkPaths(zk_root), EventCallbackSettings(CallbackTarget(server.url)))
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(10)
    server.close()


@pytest.fixture
def origin(api, spawn_agent, tmp_path):
    media = tmp_path / "media"
    node = spawn_agent("origin", "us-east-1", media="nginx",
                       extra_env={"SM_MEDIA_ROOT": str(media), "AGENT_PREVIEW_INTERVAL_S": "1"})
    wait_for_nodes(api, 1)
    return node, media


def session_of(zk, zk_root, name: str) -> str:
    data, _ = zk.get(ZkPaths(zk_root).stream(StreamKey("live", name)))
    return StreamRecord.from_json(data).session_id


def live(api, name):
    return api.get(f"{P}/event/live/{name}/stats").status_code == 200


def publish_live(api, host, procs, zk, zk_root, tmp_path, name: str):
    """A real ffmpeg publisher of live/<name> on the origin at ``host``, once the stream is live: its
    process and the session's id."""
    publisher = procs(PUBLISH + [f"rtmp://{host}/live/{name}"], log_path=tmp_path / "pub.log")
    wait_until(lambda: live(api, name), 10, what="the stream live")
    return publisher, session_of(zk, zk_root, name)


def whole_session(session: str) -> list[tuple]:
    """The events of a session that went its whole way, in order."""
    return [("stream-available", "HLS-LIVE", session), ("stream-available", "IMG-PREVIEW", session),
            ("stream-available", "HLS-VOD", session), ("stream-closed", None, session)]


def test_a_session_announces_live_hls_and_previews_then_its_vod_and_closes_last(api, origin, receiver, procs, zk,
                                                                                 zk_root, tmp_path):
    (_, host, _, _), media = origin
    publisher, session = publish_live(api, host, procs, zk, zk_root, tmp_path, "art")
    first, second = receiver.wait_for(2, 15)
    assert [event_tuple(r) for r in (first, second)] == [("stream-available", "HLS-LIVE", session),
                                                         ("stream-available", "IMG-PREVIEW", session)]
    for event in (first, second):
        assert event["x-streaming-channel"] == "live/art" and event["x-resolution"] == "320x180-30"
    playlist = first["x-index-file"]
    assert playlist == str(media.resolve() / "hls" / "live" / "art" / "index.m3u8")
    assert "#EXTINF" in open(playlist).read()
    index_path = second["x-index-file"]
    assert index_path == str(media.resolve() / "sessions" / "live" / "art" / session / "preview" / "index.json")
    wait_until(lambda: len(json.load(open(index_path))["images"]) >= 2, 8, what="previews every second")
    index = json.load(open(index_path))
    assert index["streamingId"] == session and index["channel"] == "live/art"
    for image in index["images"]:
        assert open(image["path"], "rb").read(3) == b"\xff\xd8\xff"  # JPEG

    publisher.signal(signal.SIGINT)
    events = receiver.wait_for(4, 20)
    assert [event_tuple(r) for r in events] == whole_session(session)
    vod = events[2]["x-index-file"]
    assert vod == str(media.resolve() / "sessions" / "live" / "art" / session / "vod" / "index.m3u8")
    text = open(vod).read()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and "#EXT-X-ENDLIST" in text
    assert events[2]["x-resolution"] == "320x180-30"
    assert not list((media / "record" / "live").glob("art-*.flv"))  # the recording became the VOD


def test_the_close_command_stops_a_real_publisher_and_leads_to_stream_closed(api, origin, receiver, procs, zk,
                                                                             zk_root, tmp_path):
    (agent_proc, host, _, _), _ = origin
    publisher, session = publish_live(api, host, procs, zk, zk_root, tmp_path, "closeme")
    response = api.post("/commands/close", headers={"x-streaming-channel": "live/closeme",
                                                    "x-streaming-id": session})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert publisher.popen.wait(10) != 0  # dropped by nginx: the publisher's connection ended
    wait_until(lambda: not live(api, "closeme"), 3, what="the stream gone")
    wait_until(lambda: any(r["x-event-type"] == "stream-closed" for r in receiver.accepted()), 15,
               what="stream-closed delivered")
    closing = receiver.accepted()
    assert closing[-1]["x-streaming-id"] == session and closing[-1]["x-event-type"] == "stream-closed"
    assert all(r["x-streaming-id"] == session for r in closing)
    assert agent_proc.popen.poll() is None


def test_live_hls_fragments_leave_the_disk_once_out_of_the_playlist_and_the_stream_directory_after_the_end(
        api, spawn_agent, tmp_path, procs):
    """nginx-rtmp's own hls_cleanup runs only in a cache manager process, which the agent's single-process
    nginx has none of: without the agent's sweep every fragment of every stream stayed on disk."""
    from node_agent.artifacts import playlist_segments

    media = tmp_path / "media"
    # 1 s fragments, a 2 s playlist (AGENT_HLS_*): a fragment stays twice the playlist length, not for ever
    host = spawn_agent("origin", "us-east-1", media="nginx",
                       extra_env={"SM_MEDIA_ROOT": str(media), "AGENT_HLS_FRAGMENT_S": "1",
                                  "AGENT_HLS_PLAYLIST_S": "2"})[1]
    wait_for_nodes(api, 1)
    publisher = procs(PUBLISH + [f"rtmp://{host}/live/hlsgc"])
    wait_until(lambda: live(api, "hlsgc"), 10, what="the stream live")
    stream_dir = media / "hls" / "live" / "hlsgc"
    first = wait_until(lambda: playlist_segments(stream_dir / "index.m3u8"), 15, what="a live playlist")[0]
    wait_until(lambda: first not in playlist_segments(stream_dir / "index.m3u8"), 30, what="the playlist moving on")
    wait_until(lambda: not first.exists(), 40, what="the first fragment deleted")
    current = playlist_segments(stream_dir / "index.m3u8")
    assert current and all(segment.exists() for segment in current)  # what players may fetch is there
    lengths = [float(x) for x in re.findall(r"#EXTINF:([0-9.]+),", (stream_dir / "index.m3u8").read_text())]
    assert lengths and min(lengths) < 1.5, lengths  # the configured 1 s fragments (by default 2 s)
    publisher.signal(signal.SIGINT)
    wait_until(lambda: not live(api, "hlsgc"), 10, what="the stream ended")
    wait_until(lambda: not stream_dir.exists(), 60, what="the ended stream's HLS directory removed")


def test_the_hls_lengths_reach_nginx_in_the_units_it_takes_and_a_playlist_shorter_than_a_fragment_is_refused(
        tmp_path):
    from node_agent.config import AgentSettings
    from node_agent.media import NginxConfig
    from streammanager.config import ConfigError

    base = {"AGENT_ROLE": "origin", "AGENT_REGION": "us-east-1"}
    settings = AgentSettings.from_env({**base, "AGENT_HLS_FRAGMENT_S": "1.5", "AGENT_HLS_PLAYLIST_S": "6"})
    text = NginxConfig(work_dir=tmp_path, host="127.0.1.77", rtmp_port=1935, stat_port=18123,
                       hook_url="http://127.0.1.77:9000/hooks/nginx", media_root=tmp_path / "media",
                       hls_fragment_s=settings.hls_fragment_s, hls_playlist_s=settings.hls_playlist_s).render()
    assert "hls_fragment 1500ms;" in text and "hls_playlist_length 6000ms;" in text  # nginx takes no "1.5s"
    with pytest.raises(ConfigError, match="AGENT_HLS_PLAYLIST_S"):
        AgentSettings.from_env({**base, "AGENT_HLS_FRAGMENT_S": "4", "AGENT_HLS_PLAYLIST_S": "2"})


def test_an_origin_stopped_mid_session_ends_it_with_its_vod_then_stream_closed(api, origin, receiver, procs, zk,
                                                                              zk_root, tmp_path):
    (agent_proc, host, _, _), media = origin
    publisher, session = publish_live(api, host, procs, zk, zk_root, tmp_path, "stopme")
    receiver.wait_for(2, 15)  # HLS-LIVE and IMG-PREVIEW: the session is well under way

    agent_proc.signal(signal.SIGTERM)
    assert agent_proc.popen.wait(25) == 0, agent_proc.log()
    assert publisher.popen.wait(10) != 0  # its publisher was dropped (its encoder would reconnect elsewhere)
    events = receiver.wait_for(4, 15)
    assert [event_tuple(r) for r in events] == whole_session(session)
    vod = events[2]["x-index-file"]
    assert vod == str(media.resolve() / "sessions" / "live" / "stopme" / session / "vod" / "index.m3u8")
    assert "#EXT-X-ENDLIST" in open(vod).read()
    assert not list((media / "record" / "live").glob("stopme-*.flv"))  # the recording became the VOD
    assert not zk.exists(ZkPaths(zk_root).callback_session("live/stopme", session))  # closed by the agent itself
