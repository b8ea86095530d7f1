"""Publish key verification against a real HTTP receiver of ours: headers, every auth mode, refusals,
timeouts, and a real ffmpeg publisher refused at a real nginx-rtmp origin."""
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from streammanager.coordinator_config import CallbackTarget, HttpAuth
from streammanager.models import StreamKey
from streammanager.registry import ZkPaths
from tests.conftest import wait_until
from tests.coordinator_helpers import receiver  # noqa: F401 (a fixture)
from tests.coordinator_helpers import Receiver, basic
from tests.test_media_e2e import PUBLISH

P = "/streammanager/api/2.0"




def live(api, name):
    return api.get(f"{P}/event/live/{name}/stats").status_code == 200


@pytest.mark.parametrize("auth, expected", [
    (HttpAuth(), None),
    (HttpAuth("Basic", user="app", password="s3cret"), basic("app", "s3cret")),
    (HttpAuth("Bearer", token="tok-123"), "Bearer tok-123"),
    (HttpAuth("Custom", custom="X-Api-Key abc"), "X-Api-Key abc"),
])
def test_a_publish_is_verified_with_an_empty_post_carrying_channel_key_user_ip_and_auth(api, make_node, receiver,
                                                                                      auth, expected):
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, auth, 2.0))
    response = origin.hook("publish", "cam", clientid="p1", type="live", key="the-key", addr="198.51.100.7")
    assert response.status_code == 200, response.text
    [request] = receiver.requests()
    assert request.method == "POST" and request.body == b""
    assert request["x-streaming-channel"] == "live/cam"
    assert request["x-streaming-key"] == "the-key"
    assert request["x-user-ip"] == "198.51.100.7"
    assert request["authorization"] == expected
    wait_until(lambda: live(api, "cam"), 3, what="the verified stream live")


@pytest.mark.parametrize("status", [401, 403, 404, 500, 201, 302])
def test_any_answer_but_200_refuses_the_publisher_and_the_stream_never_goes_live(api, make_node, receiver, status):
    receiver.answer = lambda headers: status
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 2.0))
    response = origin.hook("publish", "denied", clientid="p1", type="live", key="bad")
    assert response.status_code == 403 and "refused" in response.text
    assert origin.agent.table.published() == []
    time.sleep(0.3)
    assert not live(api, "denied")


def test_a_verifier_that_does_not_answer_within_the_timeout_refuses_the_publisher(make_node, receiver):
    receiver.delay_s = 2.0
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 0.5))
    started = time.monotonic()
    response = origin.hook("publish", "slow", clientid="p1", type="live", key="k")
    assert response.status_code == 403 and time.monotonic() - started < 1.5


def test_a_verifier_that_trickles_its_200_out_past_the_timeout_refuses_the_publisher(make_node, receiver):
    # each byte came well within the timeout, so the publisher was allowed after the whole answer took 3 s
    receiver.trickle_s = 3.0
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 1.0))
    response = origin.hook("publish", "trickled", clientid="p1", type="live", key="k")
    assert response.status_code == 403 and "did not answer" in response.text
    assert origin.agent.table.published() == []


def test_an_unreachable_verifier_refuses_the_publisher(make_node):
    from streammanager.zookeeper import free_port

    origin = make_node("origin", "us-east-1",
                       key_verification=CallbackTarget(f"http://127.0.0.1:{free_port()}/verify", HttpAuth(), 1.0))
    assert origin.hook("publish", "nobody", clientid="p1", type="live", key="k").status_code == 403


def test_without_a_verification_url_every_key_is_accepted(api, make_node, receiver):
    origin = make_node("origin", "us-east-1")
    assert origin.hook("publish", "open", clientid="p1", type="live").status_code == 200
    assert receiver.requests() == []


def test_an_edges_relay_publish_is_not_sent_to_the_verifier(make_node, receiver):
    edge = make_node("edge", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 2.0))
    relaykey = edge.agent.relay_keys.issue(StreamKey("live", "relayed"))
    assert edge.hook("publish", "relayed", clientid="r1", type="live", relaykey=relaykey).status_code == 200
    assert receiver.requests() == []


def test_a_relay_key_opens_one_publish_of_its_own_stream_on_the_edge_and_nothing_else(make_node):
    # the relay's ffmpeg has its key in its argv (``ps``): one key per agent let any local user publish
    # any stream on the edge, for as long as the agent ran
    edge = make_node("edge", "us-east-1")
    key = edge.agent.relay_keys.issue(StreamKey("live", "mine"))
    assert edge.hook("publish", "other", clientid="x1", type="live", relaykey=key).status_code == 403
    assert edge.hook("publish", "mine", clientid="r1", type="live", relaykey=key).status_code == 200
    edge.hook("publish_done", "mine", clientid="r1")
    assert edge.hook("publish", "mine", clientid="x2", type="live", relaykey=key).status_code == 403  # used up
    assert edge.hook("publish", "mine", clientid="x3", type="live", relaykey="").status_code == 403



def test_relay_keys_that_expired_unused_are_forgotten_whatever_their_stream(make_node):
    # a relay whose ffmpeg never published (its origin went) left its key for good, one per stream name
    edge = make_node("edge", "us-east-1")
    keys = edge.agent.relay_keys
    keys.TTL_S = 0.0  # every key expires at once
    for i in range(1000):
        keys.issue(StreamKey("live", f"never-published-{i}"))
    assert len(keys._issued) == 1  # the last one's
    keys.TTL_S = 60.0
    key = keys.issue(StreamKey("live", "relayed"))
    assert list(keys._issued) == ["live/relayed"]
    assert edge.hook("publish", "relayed", clientid="r1", type="live", relaykey=key).status_code == 200

def test_a_refused_key_stops_a_real_ffmpeg_publisher_and_the_right_key_goes_live(api, spawn_agent, receiver, procs,
                                                                              tmp_path):
    receiver.answer = lambda headers: 200 if headers.get("x-streaming-key") == "good" else 403
    _, host, _, _ = spawn_agent("origin", "us-east-1", media="nginx", extra_env={
        "KEY_VERIFICATION_URL": receiver.url, "KEY_VERIFICATION_AUTH": "Bearer",
        "KEY_VERIFICATION_AUTH_TOKEN": "app-token", "SM_MEDIA_ROOT": str(tmp_path / "media")})
    started = time.monotonic()
    refused = subprocess.run(PUBLISH + [f"rtmp://{host}/live/keyed?key=bad"], capture_output=True, timeout=20)
    assert refused.returncode != 0 and time.monotonic() - started < 10
    [request] = receiver.requests()
    assert (request["x-streaming-channel"], request["x-streaming-key"], request["x-user-ip"],
            request["authorization"]) == ("live/keyed", "bad", "127.0.0.1", "Bearer app-token")
    assert not live(api, "keyed")
    publisher = procs(PUBLISH + [f"rtmp://{host}/live/keyed?key=good"], log_path=tmp_path / "good.log")
    wait_until(lambda: live(api, "keyed"), 10, what="the stream with the right key live")
    assert publisher.popen.poll() is None


@pytest.mark.parametrize("key", ["€uro-key", "café", "ключ-1"])
def test_a_key_outside_ascii_reaches_the_verifier_as_the_publishers_utf8_bytes_and_is_never_a_500(
        make_node, receiver, key):
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 2.0))
    response = origin.hook("publish", "intl", clientid="p1", type="live", key=key)
    assert response.status_code == 200, response.text
    [request] = receiver.requests()
    assert request["x-streaming-key"].encode("latin-1").decode("utf-8") == key  # http.server reads latin-1


def test_a_key_that_cannot_be_a_header_value_is_refused_with_403_without_asking(make_node, receiver):
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 2.0))
    response = origin.hook("publish", "crlf", clientid="p1", type="live", key="k\r\nx-evil: 1")
    assert response.status_code == 403 and "cannot be sent" in response.text
    assert receiver.requests() == [] and origin.agent.table.published() == []


@pytest.mark.parametrize("auth, expected", [(HttpAuth(), None), (HttpAuth("Bearer", token="tok-9"), "Bearer tok-9"),
                                            (HttpAuth("Custom", custom="ApiKey k"), "ApiKey k")])
def test_a_netrc_entry_for_the_applications_host_never_replaces_or_adds_the_authorization(
        make_node, receiver, tmp_path, monkeypatch, auth, expected):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # requests reads it (as ~/.netrc) for every host it calls
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, auth, 2.0))
    assert origin.hook("publish", "netrc", clientid="p1", type="live", key="k").status_code == 200
    [request] = receiver.requests()
    assert request["authorization"] == expected


def test_only_a_registered_edge_pulling_from_its_own_address_is_not_counted_as_a_viewer(make_node):
    # ``?relay=x`` or ffmpeg's -rtmp_flashver ngx-local-relay made any player watch uncounted: not in the
    # stream's subscribers, not against the node's capacity
    origin = make_node("origin", "us-east-1")
    edge = make_node("edge", "us-east-1")
    assert origin.publish("counted").status_code == 200

    def subscribers(node):
        load = node.agent.table.loads().get("live/counted")
        return load.subscribers if load else 0

    pulls = [{"relay": edge.agent.settings.node_id},  # on one machine, pulls come from 127.0.0.1
             {"relay": edge.agent.settings.node_id, "addr": edge.host}]
    for n, extra in enumerate(pulls):
        assert origin.hook("play", "counted", clientid=f"pull-{n}", **extra).status_code == 200
    assert subscribers(origin) == 0
    pretenders = [{"relay": "x"}, {"relay": origin.agent.settings.node_id},  # not an edge
                  {"relay": edge.agent.settings.node_id, "addr": "198.51.100.9"},  # not from the edge
                  {"relay": "../nodes", "addr": "127.0.0.1"}, {"flashver": "ngx-local-relay"}]
    for n, extra in enumerate(pretenders):
        assert origin.hook("play", "counted", clientid=f"viewer-{n}", **extra).status_code == 200
    assert subscribers(origin) == len(pretenders)
    # on an edge no play is a pull (its relays publish into it)
    assert edge.hook("play", "counted", clientid="e1", flashver="ngx-local-relay").status_code == 200
    assert edge.hook("play", "counted", clientid="e2", relay=edge.agent.settings.node_id).status_code == 200
    assert subscribers(edge) == 2


def test_a_publisher_that_leaves_while_its_key_is_verified_never_goes_live(api, make_node, receiver, zk, zk_root):
    # nginx-rtmp sends publish_done for a publisher that disconnects while its publish hook waits for
    # the verifier; that hook then must not make the stream live (a ghost nobody publishes)
    asked = threading.Event()
    receiver.answer = lambda headers: (asked.set(), 200)[1]
    receiver.delay_s = 1.0
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 3.0))
    with ThreadPoolExecutor(1) as pool:
        publishing = pool.submit(origin.hook, "publish", "ghost", clientid="p1", type="live", key="k")
        assert asked.wait(5), "the verifier was not asked"
        assert origin.hook("publish_done", "ghost", clientid="p1").status_code == 200  # it left meanwhile
        response = publishing.result(10)
    assert response.status_code == 403 and "left" in response.text
    assert origin.agent.table.published() == []
    paths = ZkPaths(zk_root)
    assert not zk.exists(paths.stream(StreamKey("live", "ghost")))  # no claim to refuse its reconnection
    wait_until(lambda: not zk.get_children(paths.callback_sessions) if zk.exists(paths.callback_sessions)
               else True, 5, what="no open-session marker left")
    assert not live(api, "ghost")
    # its encoder reconnecting is a publisher like any other
    assert origin.hook("publish", "ghost", clientid="p2", type="live", key="k").status_code == 200
    wait_until(lambda: live(api, "ghost"), 5, what="the stream live from its new connection")


def _verifications_held(receiver, count: int) -> list:
    """The verifier answers its n-th request (200) once ``release[n]`` is set; ``release[n].arrived`` is
    set when that request came."""
    release = [threading.Event() for _ in range(count)]
    for gate in release:
        gate.arrived = threading.Event()
    asked = iter(range(count))

    def answer(headers):
        gate = release[next(asked)]
        gate.arrived.set()
        gate.wait(10)
        return 200
    receiver.answer = answer
    return release


def _publishes_of_a_dead_and_a_new_nginx(origin, pool, release):
    """A publish of ``live/again`` by client 7 held in verification, its nginx dying, then the restarted
    nginx's publish of the same stream by its own client 7, held too."""
    dead = pool.submit(origin.hook, "publish", "again", clientid="7", type="live", key="k")
    assert release[0].arrived.wait(5), "the verifier was not asked"
    origin.agent._media_exited()  # its nginx died; the agent starts the next one
    new = pool.submit(origin.hook, "publish", "again", clientid="7", type="live", key="k")
    assert release[1].arrived.wait(5), "the verifier was not asked again"
    return dead, new


def test_a_dead_nginxs_publish_and_the_next_nginxs_with_the_same_client_id_are_told_apart(api, make_node, receiver,
                                                                                       zk, zk_root):
    # a restarted nginx numbers its clients afresh: the same stream and client id can be the dead nginx's
    # publish, still being verified, and the new nginx's at once. The new hook's mark overwrote the old
    # one's: the dead nginx's publish went live (a ghost), and the new publisher that left was not undone
    release = _verifications_held(receiver, 2)
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 8.0))
    with ThreadPoolExecutor(2) as pool:
        dead, new = _publishes_of_a_dead_and_a_new_nginx(origin, pool, release)
        release[0].set()
        first = dead.result(10)
        assert first.status_code == 403 and "left" in first.text  # its publisher went with that nginx
        assert origin.hook("publish_done", "again", clientid="7").status_code == 200  # the new one leaves
        release[1].set()
        second = new.result(10)
    assert second.status_code == 403 and "left" in second.text
    assert origin.agent.table.published() == []
    assert not zk.exists(ZkPaths(zk_root).stream(StreamKey("live", "again")))
    assert not live(api, "again")


def test_a_publish_whose_nginx_died_while_its_key_was_verified_never_goes_live(api, spawn_agent, receiver, procs, zk,
                                                                               zk_root, tmp_path):
    # its publisher went with that nginx (and no publish_done comes from a dead nginx): allowing it
    # afterwards made a ghost stream, claimed and "live", that refused its encoder's reconnection
    asked = threading.Event()
    receiver.answer = lambda headers: (asked.set(), 200)[1]
    receiver.delay_s = 3.0
    agent_proc, host, http_port, _ = spawn_agent("origin", "us-east-1", media="nginx", extra_env={
        "KEY_VERIFICATION_URL": receiver.url, "AGENT_KEY_VERIFICATION_TIMEOUT_S": "6",
        "SM_MEDIA_ROOT": str(tmp_path / "media")})
    [nginx] = subprocess.run(["pgrep", "-P", str(agent_proc.pid), "nginx"], capture_output=True,
                             text=True).stdout.split()
    procs(PUBLISH + [f"rtmp://{host}/live/orphan?key=k"], log_path=tmp_path / "pub.log")
    assert asked.wait(15), "the verifier was not asked"
    os.kill(int(nginx), signal.SIGKILL)  # the agent restarts it, and forgets its clients
    wait_until(lambda: "stream published" in agent_proc.log() or "before its publish was allowed" in agent_proc.log(),
               15, what="the publish hook answered")
    assert "stream published" not in agent_proc.log()
    # the hook logs its refusal, then releases the claim
    wait_until(lambda: not zk.exists(ZkPaths(zk_root).stream(StreamKey("live", "orphan"))), 5,
               what="no claim to refuse its encoder's reconnection")
    wait_until(lambda: not live(api, "orphan"), 5, what="the stream live nowhere")
    # what the agent's metrics say of it: nginx restarted once, and serves again
    metrics = requests.get(f"http://{host}:{http_port}/metrics", timeout=5).text
    assert "sm_agent_media_restarts_total 1.0" in metrics
    wait_until(lambda: "sm_agent_media_serving 1.0" in requests.get(f"http://{host}:{http_port}/metrics",
                                                                   timeout=5).text, 15, what="nginx serving again")


def test_a_dead_nginxs_publish_allowed_late_does_not_end_the_next_nginxs_live_publisher(api, make_node, receiver,
                                                                                      zk, zk_root):
    # the same stream and client id, the dead nginx's publish still being verified when the restarted
    # nginx's is allowed (the verifier answered it first): the dead one's hook found the new publisher
    # in the table under its client id, took its session for its own, and undid it (claim released,
    # session discarded) while its encoder went on publishing: a live stream no lookup could find
    release = _verifications_held(receiver, 2)
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 8.0))
    with ThreadPoolExecutor(2) as pool:
        dead, new = _publishes_of_a_dead_and_a_new_nginx(origin, pool, release)
        release[1].set()
        assert new.result(10).status_code == 200  # the new nginx's publisher is live
        release[0].set()
        first = dead.result(10)
    assert first.status_code == 403  # its publisher went with that nginx
    assert [s.publisher for s in origin.agent.table.published()] == ["7"]
    assert zk.exists(ZkPaths(zk_root).stream(StreamKey("live", "again")))
    wait_until(lambda: live(api, "again"), 5, what="the new publisher's stream live")
    assert not origin.agent._publishes_under_way


def test_a_burst_of_new_streams_never_takes_the_node_record_past_its_limit(make_node, receiver, zk, zk_root):
    # every publish of a burst passed the check of the last record's size (the burst's streams are in
    # none yet): all were let in, the next record was over --max-record-bytes, and it was never written.
    # The streams were live (claimed, their encoders publishing) and in no lookup's answer
    limit, burst = 4000, 40  # 40 entries of some 145 bytes: half as much again as the limit
    arrived, release, lock = [], threading.Event(), threading.Lock()

    def answer(headers):
        with lock:
            arrived.append(1)
        release.wait(20)
        return 200

    receiver.answer = answer
    origin = make_node("origin", "us-east-1", capacity=10_000, max_record_bytes=limit,
                       key_verification=CallbackTarget(receiver.url, HttpAuth(), 30.0))
    path = ZkPaths(zk_root).node(origin.id)
    names = [f"b{i:02d}-" + "x" * 100 for i in range(burst)]
    with ThreadPoolExecutor(burst) as pool:
        answers = [pool.submit(origin.hook, "publish", name, clientid=f"c{i}", type="live", key="k")
                   for i, name in enumerate(names)]
        wait_until(lambda: len(arrived) == burst, 10, what="every publish being verified")
        release.set()
        statuses = [a.result(30).status_code for a in answers]
    accepted = [name for name, status in zip(names, statuses) if status == 200]
    assert accepted and set(statuses) == {200, 503}
    wait_until(lambda: all(name.encode() in zk.get(path)[0] for name in accepted), 10,
               what="every stream let in shown in the node record")
    assert len(zk.get(path)[0]) <= limit
