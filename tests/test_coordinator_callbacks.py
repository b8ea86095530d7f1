"""Event callbacks: the durable queue in ZooKeeper, delivered to a real HTTP receiver of ours by the
dispatcher, in order, with retries, across controller fail-over."""
import signal
import threading
import time

import pytest
from kazoo.exceptions import NoNodeError

from streammanager.callbacks import CallbackDispatcher
from streammanager.coordinator_config import CallbackTarget, EventCallbackSettings, HttpAuth
from streammanager.events import (
    STREAM_HLS_LIVE,
    STREAM_HLS_VOD,
    STREAM_IMG_PREVIEW,
    CallbackEvent,
    EventQueue,
    OpenSession,
)
from streammanager.models import StreamKey
from streammanager.registry import ZkPaths
from tests.conftest import BIN, wait_until
from tests.coordinator_helpers import receiver  # noqa: F401 (a fixture)
from tests.coordinator_helpers import Receiver, basic, event_tuple, fails_then_accepts

P = "/streammanager/api/2.0"




@pytest.fixture
def paths(zk_root):
    return ZkPaths(zk_root)


@pytest.fixture
def queue(zk, paths):
    return EventQueue(zk, paths)


@pytest.fixture
def run_dispatcher(zk, paths):
    """Start a dispatcher's ``run`` in a thread (as a controller leader would); stopped at teardown."""
    running = []

    def start(target: CallbackTarget, **kw) -> CallbackDispatcher:
        settings = EventCallbackSettings(target, retry_initial_s=kw.pop("retry_initial_s", 0.1),
                                         retry_max_s=kw.pop("retry_max_s", 0.4))
        dispatcher = CallbackDispatcher(zk, paths, settings, **kw)
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        return dispatcher

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(10)


def session_events(channel: str, session: str) -> list[CallbackEvent]:
    """What an origin queues for one full session, in order."""
    root = f"/srv/media/sessions/{channel}/{session}"
    return [
        CallbackEvent.available(channel, session, STREAM_HLS_LIVE, "320x180-30", f"/srv/media/hls/{channel}/index.m3u8"),
        CallbackEvent.available(channel, session, STREAM_IMG_PREVIEW, "320x180-30", f"{root}/preview/index.json"),
        CallbackEvent.available(channel, session, STREAM_HLS_VOD, "320x180-30", f"{root}/vod/index.m3u8"),
        CallbackEvent.closed(channel, session),
    ]


def queued(zk, paths) -> int:
    if zk.exists(paths.callback_queue) is None:
        return 0
    count = 0
    for channel in zk.get_children(paths.callback_queue):
        try:
            count += len(zk.get_children(f"{paths.callback_queue}/{channel}"))
        except NoNodeError:  # the dispatcher removed an emptied channel meanwhile
            continue
    return count


@pytest.mark.parametrize("auth, expected", [
    (HttpAuth(), None),
    (HttpAuth("Basic", user="app", password="pa:ss"), basic("app", "pa:ss")),
    (HttpAuth("Bearer", token="tok-1"), "Bearer tok-1"),
    (HttpAuth("Custom", custom="ApiKey xyz"), "ApiKey xyz"),
])
def test_events_are_empty_posts_with_the_specified_headers_in_every_auth_mode(queue, run_dispatcher, receiver,
                                                                              auth, expected):
    live, closed = session_events("live/cam", "s1")[0], session_events("live/cam", "s1")[3]
    queue.enqueue(live)
    queue.enqueue(closed)
    run_dispatcher(CallbackTarget(receiver.url, auth, 2.0))
    first, second = receiver.wait_for(2)
    assert first.method == "POST" and first.body == b"" and first["content-length"] in ("0", None)
    assert first["authorization"] == expected and second["authorization"] == expected
    assert (first["x-streaming-channel"], first["x-streaming-id"], first["x-event-type"]) == \
        ("live/cam", "s1", "stream-available")
    assert (first["x-stream-type"], first["x-resolution"], first["x-index-file"]) == \
        ("HLS-LIVE", "320x180-30", "/srv/media/hls/live/cam/index.m3u8")
    assert second["x-event-type"] == "stream-closed" and second["x-streaming-id"] == "s1"
    for name in ("x-stream-type", "x-resolution", "x-index-file"):
        assert second[name] is None  # only stream-available carries them


def test_a_receiver_failing_three_times_then_answering_200_gets_every_event_exactly_once_in_order(
        zk, paths, queue, run_dispatcher, receiver):
    receiver.answer = fails_then_accepts(3)
    events = session_events("live/show", "a1") + session_events("live/show", "b2")
    for event in events:
        queue.enqueue(event)
    dispatcher = run_dispatcher(CallbackTarget(receiver.url, HttpAuth(), 2.0))
    got = receiver.wait_for(len(events), 15)
    assert [event_tuple(r) for r in got] == [(e.event_type, e.stream_type or None, e.session_id) for e in events]
    assert [r.status for r in receiver.requests()] == [500, 500, 500] + [200] * len(events)
    wait_until(lambda: queued(zk, paths) == 0, 5, what="the queue emptied")
    time.sleep(0.3)
    assert len(receiver.requests()) == len(events) + 3 and dispatcher.sent == len(events)


def test_retries_back_off_and_a_failing_channel_never_holds_back_the_others(zk, paths, queue, run_dispatcher,
                                                                            receiver):
    receiver.answer = lambda h: 503 if h["x-streaming-channel"] == "live/broken" else 200
    receiver.delay_s = 0.05
    queue.enqueue(CallbackEvent.closed("live/broken", "x"))
    for n in range(6):
        queue.enqueue(CallbackEvent.closed(f"live/ok{n}", f"s{n}"))
    run_dispatcher(CallbackTarget(receiver.url, HttpAuth(), 2.0), retry_initial_s=0.2, retry_max_s=0.8)
    wait_until(lambda: {r["x-streaming-channel"] for r in receiver.accepted()} == {f"live/ok{n}" for n in range(6)},
               5, what="every healthy channel delivered")
    time.sleep(2.5)
    attempts = [r for r in receiver.requests() if r["x-streaming-channel"] == "live/broken"]
    # 0.2, 0.4, 0.8, 0.8 ... s apart: a handful of attempts in ~3 s, not a busy loop
    assert 3 <= len(attempts) <= 7
    assert queued(zk, paths) == 1  # the failing event is kept, never dropped


def test_a_channel_its_application_refuses_for_good_shows_in_the_metrics_until_it_is_accepted(
        zk, paths, queue, run_dispatcher, receiver):
    from prometheus_client import REGISTRY

    def metric(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    refused_before = metric("sm_callback_deliveries_total", outcome="refused")
    delivered_before = metric("sm_callback_deliveries_total", outcome="delivered")
    accept = threading.Event()
    receiver.answer = lambda h: 200 if accept.is_set() or h["x-streaming-channel"] != "live/refused" else 422
    queue.enqueue(CallbackEvent.closed("live/refused", "r1"))
    queue.enqueue(CallbackEvent.closed("live/fine", "f1"))
    run_dispatcher(CallbackTarget(receiver.url, HttpAuth(), 2.0), retry_initial_s=0.1, retry_max_s=0.2)

    # the refused event is kept and retried (the contract), and the operator can see the channel stuck
    wait_until(lambda: metric("sm_callback_deliveries_total", outcome="refused") >= refused_before + 3, 10,
               what="the refused event retried")
    wait_until(lambda: metric("sm_callback_blocked_channels") == 1 and metric("sm_callback_blocked_seconds") > 0.3,
               10, what="one channel reported blocked")
    assert metric("sm_callback_deliveries_total", outcome="delivered") >= delivered_before + 1  # the other went

    accept.set()
    wait_until(lambda: queued(zk, paths) == 0, 10, what="the refused event accepted at last")
    wait_until(lambda: metric("sm_callback_blocked_channels") == 0 and metric("sm_callback_blocked_seconds") == 0,
               10, what="no channel blocked any more")


def test_an_answer_trickled_out_past_the_timeout_is_no_answer_and_the_event_is_sent_again(
        zk, paths, queue, run_dispatcher, receiver):
    receiver.trickle_s = 3.0  # each byte well within the 1 s timeout: the whole answer took 3 s
    queue.enqueue(CallbackEvent.closed("live/trickle", "t1"))
    dispatcher = run_dispatcher(CallbackTarget(receiver.url, HttpAuth(), 1.0), retry_initial_s=0.1, retry_max_s=0.2)
    wait_until(lambda: dispatcher.failed >= 1, 10, what="the trickled answer taken as no answer")
    assert dispatcher.sent == 0 and queued(zk, paths) == 1
    receiver.trickle_s = 0.0
    wait_until(lambda: queued(zk, paths) == 0, 10, what="the event delivered once the application answers")
    assert dispatcher.sent == 1 and len(receiver.requests()) >= 2


def test_without_an_event_callback_url_events_are_consumed_and_none_is_sent(zk, paths, queue, run_dispatcher,
                                                                          receiver):
    for event in session_events("live/quiet", "q1"):
        queue.enqueue(event)
    run_dispatcher(CallbackTarget(None))
    wait_until(lambda: queued(zk, paths) == 0, 5, what="the queue consumed")
    assert receiver.requests() == []


def test_a_copy_queued_by_a_retried_create_is_not_delivered_twice(zk, paths, queue, run_dispatcher, receiver):
    event = CallbackEvent.closed("live/dup", "d1")
    queue.enqueue(event)
    queue.enqueue(event)  # same event id, as a create retried after a lost connection leaves it
    queue.enqueue(CallbackEvent.closed("live/dup", "d2"))
    run_dispatcher(CallbackTarget(receiver.url))
    wait_until(lambda: queued(zk, paths) == 0, 5, what="the queue emptied")
    assert [r["x-streaming-id"] for r in receiver.requests()] == ["d1", "d2"]


def test_a_simulated_origin_stopped_with_a_publisher_on_closes_its_session_itself(api, make_node, zk, paths):
    # as an origin with nginx does (it drops its publishers and their sessions end as usual); a simulated
    # one left its open sessions to the controller's reaper, which closed them only once the node was gone
    origin = make_node("origin", "us-east-1")
    assert origin.publish("stopped").status_code == 200
    [stream] = origin.agent.table.published()
    wait_until(lambda: len(zk.get_children(paths.callback_sessions)) == 1, 5, what="the session's marker")
    origin.agent.stop()
    assert zk.get_children(paths.callback_sessions) == []  # closed by the origin, not left for a reaper
    events = [zk.get(f"{paths.callback_channel('live/stopped')}/{name}")[0]
              for name in zk.get_children(paths.callback_channel("live/stopped"))]
    assert len(events) == 1 and b"stream-closed" in events[0] and stream.session_id.encode() in events[0]


def test_the_session_of_a_dead_origin_is_closed_by_the_reaper(zk, paths, queue, run_dispatcher, receiver):
    queue.open_session(OpenSession("live/orphan", "o1", "origin-that-died", 123, 456))
    run_dispatcher(CallbackTarget(receiver.url), reap_interval_s=0.2, orphan_grace_s=0.5)
    [closed] = receiver.wait_for(1, 5)
    assert (closed["x-event-type"], closed["x-streaming-channel"], closed["x-streaming-id"]) == \
        ("stream-closed", "live/orphan", "o1")
    wait_until(lambda: zk.get_children(paths.callback_sessions) == [], 3, what="the open session removed")


def test_a_simulated_origin_sends_exactly_one_stream_closed_per_session_and_no_stream_available(
        api, make_node, zk, paths, run_dispatcher, receiver):
    origin = make_node("origin", "us-east-1")
    run_dispatcher(CallbackTarget(receiver.url))
    sessions = []
    for clientid in ("pub-1", "pub-2"):
        assert origin.publish("sim", clientid=clientid).status_code == 200
        data, _ = zk.get(paths.stream(origin.agent.table.published()[0].key))
        sessions.append(origin.agent.table.published()[0].session_id)
        assert sessions[-1] in data.decode()  # x-streaming-id is the stream record's session id
        origin.hook("publish_done", "sim", clientid=clientid)
    got = receiver.wait_for(2, 5)
    assert [event_tuple(r) for r in got] == [("stream-closed", None, s) for s in sessions]
    wait_until(lambda: zk.get_children(paths.callback_sessions) == [], 3, what="no session left open")
    time.sleep(0.5)
    assert len(receiver.requests()) == 2


def test_an_origin_frozen_past_its_session_and_reaped_drops_that_publisher_and_sends_no_second_stream_closed(
        api, spawn_agent, zk, paths, run_dispatcher, receiver):
    from tests.test_agent_process import NGINX_PUBLISH, live, post_form

    proc, host, port, _ = spawn_agent("origin", "us-east-1", extra_env={"AGENT_ZK_TIMEOUT_S": "2"})
    run_dispatcher(CallbackTarget(receiver.url), reap_interval_s=0.2, orphan_grace_s=0.5)
    assert post_form(host, port, {**NGINX_PUBLISH, "name": "frozen"}).status_code == 200
    wait_until(lambda: len(zk.get_children(paths.callback_sessions)) == 1, 5, what="the session's marker")
    proc.signal(signal.SIGSTOP)  # away past its ZooKeeper session: the reaper closes the session for it
    try:
        [closed] = receiver.wait_for(1, 20)
        assert (closed["x-event-type"], closed["x-streaming-channel"]) == ("stream-closed", "live/frozen")
    finally:
        proc.signal(signal.SIGCONT)
    # back: the application was told the session is over, so the origin ends it too (the encoder
    # reconnects as a new session); it went on with it and sent a second stream-closed at its end
    wait_until(lambda: "dropping its publisher here" in proc.log(), 20, what="the origin to drop the publisher")
    wait_until(lambda: not live(api, "frozen"), 10, what="the stream to leave the lookups")
    assert zk.get_children(paths.callback_reaped) == []  # the origin forgot the tombstone it saw
    post_form(host, port, {**NGINX_PUBLISH, "call": "publish_done", "name": "frozen"})  # nginx's, later
    time.sleep(2)
    wait_until(lambda: queued(zk, paths) == 0, 10, what="the queue emptied")
    assert [r["x-streaming-id"] for r in receiver.requests()] == [closed["x-streaming-id"]]


def test_killing_the_controller_leader_mid_retry_loses_nothing(zk, zookeeper, zk_root, paths, queue, procs,
                                                                 tmp_path, receiver):
    failing = threading.Event()
    failing.set()
    receiver.answer = lambda h: 500 if failing.is_set() else 200
    events = session_events("live/failover", "f1") + [CallbackEvent.closed("live/other", "o1")]
    for event in events:
        queue.enqueue(event)
    env = {"SM_ZK_HOSTS": zookeeper.hosts, "SM_ZK_ROOT": zk_root, "SM_ZK_TIMEOUT_S": "2",
           "SM_LOG_FORMAT": "text", "SM_LOCAL_STATE_DIR": str(tmp_path / "cloud"),
           "EVENT_CALLBACK_URL": receiver.url, "SM_EVENT_CALLBACK_RETRY_MAX_S": "0.5"}
    controllers = [procs([str(BIN / "streammanager"), "controller", "--controller-id", f"c{n}"], env,
                         tmp_path / f"controller-{n}.log") for n in (1, 2)]

    def leader_id():
        children = zk.get_children(paths.election) if zk.exists(paths.election) else []
        if not children:
            return None
        first = sorted(children, key=lambda c: c[-10:])[0]
        return zk.get(f"{paths.election}/{first}")[0].decode()

    wait_until(lambda: len(receiver.requests()) >= 3, 20, what="the leader retrying")
    leader = leader_id()
    assert leader in ("c1", "c2"), leader
    dead = controllers[0] if leader == "c1" else controllers[1]
    dead.signal(signal.SIGKILL)
    dead.popen.wait(5)
    before_takeover = len(receiver.requests())
    failing.clear()  # the application recovers while the new leader takes over
    got = receiver.wait_for(len(events), 20)
    assert leader_id() not in (None, leader)
    assert [event_tuple(r) for r in got if r["x-streaming-channel"] == "live/failover"] == \
        [(e.event_type, e.stream_type or None, e.session_id) for e in events[:4]]
    assert {r["x-streaming-id"] for r in got} == {"f1", "o1"}
    assert len(got) == len(events)  # nothing was accepted before the kill: exactly once here
    wait_until(lambda: queued(zk, paths) == 0, 5, what="the queue emptied")
    assert before_takeover >= 3


def test_an_origin_that_goes_away_with_a_live_stream_still_gets_its_stream_closed_sent(
        api, make_node, zk, paths, run_dispatcher, receiver):
    origin = make_node("origin", "us-east-1")
    assert origin.publish("abandoned").status_code == 200
    session = origin.agent.table.published()[0].session_id
    run_dispatcher(CallbackTarget(receiver.url), reap_interval_s=0.2, orphan_grace_s=1.0)
    time.sleep(1.5)
    assert receiver.requests() == []  # a live origin's session is not the reaper's
    origin.agent.stop()  # gone without a publish_done, as after a crash
    [closed] = receiver.wait_for(1, 5)
    assert event_tuple(closed) == ("stream-closed", None, session)
    assert closed["x-streaming-channel"] == "live/abandoned"


def test_a_publish_refused_half_way_blocks_neither_the_next_publish_nor_leaves_a_marker(api, make_node, zk, paths,
                                                                                      monkeypatch):
    from kazoo.exceptions import ConnectionLoss

    origin = make_node("origin", "us-east-1")
    agent = origin.agent
    real_open, real_release = agent.sessions._queue.open_session, agent.claims.release

    def open_then_time_out(marker, timeout_s=None):
        real_open(marker)  # written, but the answer is lost
        raise ConnectionLoss("ZooKeeper did not answer in time")

    def release_lost(key, session_id):
        raise ConnectionLoss("not connected")

    monkeypatch.setattr(agent.sessions._queue, "open_session", open_then_time_out)
    monkeypatch.setattr(agent.claims, "release", release_lost)
    assert origin.publish("flaky", clientid="p1").status_code == 503
    assert agent.table.published() == []
    assert zk.exists(paths.stream(StreamKey("live", "flaky")))  # the refused publish's claim is left over
    monkeypatch.setattr(agent.sessions._queue, "open_session", real_open)
    monkeypatch.setattr(agent.claims, "release", real_release)
    assert origin.publish("flaky", clientid="p2").status_code == 200  # our own stale claim is replaced
    live_session = agent.table.published()[0].session_id
    wait_until(lambda: [c.split("@")[-1] for c in zk.get_children(paths.callback_sessions)] == [live_session],
               3, what="only the live session's marker left")


@pytest.mark.parametrize("auth, expected", [(HttpAuth(), None), (HttpAuth("Bearer", token="tok-1"), "Bearer tok-1")])
def test_a_netrc_entry_for_the_applications_host_never_replaces_or_adds_the_events_authorization(
        queue, run_dispatcher, receiver, tmp_path, monkeypatch, auth, expected):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    queue.enqueue(CallbackEvent.closed("live/netrc", "s1"))
    run_dispatcher(CallbackTarget(receiver.url, auth, 2.0))
    [request] = receiver.wait_for(1)
    assert request["authorization"] == expected


def test_the_reaper_leaves_alone_a_session_of_an_origin_registered_with_a_newer_record(zk, paths, queue, receiver):
    """During a rolling upgrade a newer origin writes its node record and its stream claims in a schema this
    controller cannot decode. It is registered (its znode is there): its live sessions are not orphans.
    Taken for gone, each got a stream-closed while live and was reaped."""
    import orjson

    from streammanager.registry import ensure_layout

    ensure_layout(zk, paths)
    zk.create(paths.node("origin-newer"), orjson.dumps({"schema": 2, "id": "origin-newer", "started_ms": 123}),
              ephemeral=True)
    zk.create(paths.stream(StreamKey("live", "upgraded")), orjson.dumps({"schema": 2, "node_id": "origin-newer",
                                                                         "session_id": "s-new"}),
              ephemeral=True, makepath=True)
    queue.open_session(OpenSession("live/upgraded", "s-new", "origin-newer", 123, 456))
    queue.open_session(OpenSession("live/orphan", "s-dead", "origin-that-died", 123, 456))
    dispatcher = CallbackDispatcher(zk, paths, EventCallbackSettings(CallbackTarget(receiver.url)),
                                    orphan_grace_s=1.0)
    assert dispatcher.reap(now=100.0) == 0  # both seen for the first time: the grace begins
    assert dispatcher.reap(now=102.0) == 1  # the dead origin's session only
    live = paths.callback_session("live/upgraded", "s-new").rsplit("/", 1)[1]
    assert zk.get_children(paths.callback_sessions) == [live]  # still open
    assert queued(zk, paths) == 1  # the dead origin's stream-closed, no other
    assert dispatcher.reap(now=200.0) == 0
