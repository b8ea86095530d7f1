"""The command API (``POST /commands/close``) and the agents' command channel (close, drain)."""
import threading

import pytest

from streammanager.callbacks import CallbackDispatcher
from streammanager.commands import COMMAND_DRAIN, send_command, wait_consumed
from streammanager.coordinator_config import CallbackTarget, EventCallbackSettings, HttpAuth
from streammanager.registry import ZkPaths
from tests.conftest import asgi_call, wait_for_nodes, wait_until
from tests.coordinator_helpers import Receiver, basic

P = "/streammanager/api/2.0"


def live(api, name):
    return api.get(f"{P}/event/live/{name}/stats").status_code == 200


def close(api, channel=None, session=None, authorization=None):
    headers = {}
    if channel is not None:
        headers["x-streaming-channel"] = channel
    if session is not None:
        headers["x-streaming-id"] = session
    if authorization is not None:
        headers["Authorization"] = authorization
    return api.post("/commands/close", headers=headers)


@pytest.fixture
def origin(api, make_node):
    node = make_node("origin", "us-east-1")
    wait_for_nodes(api, 1)
    return node


def publish(api, node, name, clientid="pub-1") -> str:
    assert node.publish(name, clientid=clientid).status_code == 200
    wait_until(lambda: live(api, name), 3, what=f"{name} live")
    return next(s.session_id for s in node.agent.table.published() if s.key.name == name)


def test_closing_the_live_session_drops_the_publisher_and_queues_its_stream_closed(api, origin, zk, zk_root):
    session = publish(api, origin, "show")
    response = close(api, "live/show", session)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["closed"] == [session]
    assert origin.agent.table.published() == []  # gone when the answer comes
    wait_until(lambda: not live(api, "show"), 3, what="the stream gone from the API")
    receiver = Receiver()
    stop = threading.Event()
    dispatcher = CallbackDispatcher(zk, ZkPaths(zk_root), EventCallbackSettings(CallbackTarget(receiver.url)))
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        [event] = receiver.wait_for(1, 5)
        assert (event["x-event-type"], event["x-streaming-channel"], event["x-streaming-id"]) == \
            ("stream-closed", "live/show", session)
    finally:
        stop.set()
        thread.join(10)
        receiver.close()


def test_the_wildcard_closes_whatever_session_the_channel_has(api, origin):
    session = publish(api, origin, "any")
    response = close(api, "live/any", "*")
    assert response.status_code == 200 and response.get_json()["closed"] == [session]
    wait_until(lambda: not live(api, "any"), 3, what="the stream gone")


def test_a_new_publish_after_a_close_is_a_new_session(api, origin):
    first = publish(api, origin, "again", clientid="c1")
    assert close(api, "live/again", first).status_code == 200
    second = publish(api, origin, "again", clientid="c2")
    assert second != first
    assert close(api, "live/again", first).status_code == 404  # the old session is no longer live


@pytest.mark.parametrize("channel, session", [(None, "x"), ("live/show", None), (None, None), ("", "x"),
                                              ("live/show", "  ")])
def test_a_missing_header_is_a_400(api, origin, channel, session):
    response = close(api, channel, session)
    assert response.status_code == 400
    assert "missing header" in response.get_json()["errorMessage"]


def test_an_unknown_channel_or_session_is_a_404(api, origin):
    publish(api, origin, "known")
    assert close(api, "live/unknown", "*").status_code == 404
    assert close(api, "not-a-channel", "*").status_code == 404
    assert close(api, "live/known", "not-the-session").status_code == 404
    assert live(api, "known")


@pytest.mark.parametrize("auth, good, bad", [
    (HttpAuth("Bearer", token="cmd-token"), "Bearer cmd-token", "Bearer wrong"),
    (HttpAuth("Basic", user="app", password="pw"), basic("app", "pw"), basic("app", "nope")),
])
def test_with_commands_api_auth_wrong_or_missing_credentials_are_a_401(make_app, make_node, auth, good, bad):
    api = make_app(commands_auth=auth).test_client()
    node = make_node("origin", "us-east-1")
    wait_for_nodes(api, 1)
    session = publish(api, node, "guarded")
    refused = close(api, "live/guarded", session)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == f'{auth.method} realm="streammanager"'  # the challenge HTTP asks for
    assert close(api, "live/guarded", session, bad).status_code == 401
    assert close(api, "live/guarded", session, "Custom x").status_code == 401
    assert close(api, authorization=bad).status_code == 401  # credentials are checked first
    assert live(api, "guarded")
    assert close(api, "live/guarded", session, good).status_code == 200
    wait_until(lambda: not live(api, "guarded"), 3, what="the stream gone")


def test_a_close_that_no_origin_takes_is_withdrawn_and_answered_503(api, origin, monkeypatch):
    import streammanager.commands_api as commands_api

    session = publish(api, origin, "stuck")
    origin.agent.commands.stop()  # the agent no longer reads its commands
    monkeypatch.setattr(commands_api, "CLOSE_WAIT_S", 0.5)
    response = close(api, "live/stuck", session)
    assert response.status_code == 503
    paths = ZkPaths(origin.agent.settings.zk_root)
    assert origin.agent.client.get_children(paths.node_commands(origin.id)) == []  # withdrawn
    assert live(api, "stuck")


def test_drain_puts_a_node_into_draining_at_once_and_is_idempotent(api, make_node, zk, zk_root):
    origins = [make_node("origin", "us-east-1"), make_node("origin", "us-east-1")]
    wait_for_nodes(api, 2)
    paths = ZkPaths(zk_root)
    for _ in range(2):
        path = send_command(zk, paths, origins[0].id, COMMAND_DRAIN)
        assert wait_consumed(zk, path, 5)
    wait_until(lambda: api.get(f"{P}/admin/node/{origins[0].id}?accessToken=s3cret-token").get_json()["state"]
               == "draining", 3, what="the node record draining")
    for n in range(6):  # lookups stop sending broadcasters there
        answer = api.get(f"{P}/event/live/new{n}?action=broadcast&region=us-east-1").get_json()
        assert answer["serverAddress"] == origins[1].host
    assert origins[0].publish("refused-here").status_code == 403


def test_an_unknown_or_expired_command_is_dropped_and_the_next_one_still_runs(api, make_node, zk, zk_root):
    node = make_node("origin", "us-east-1")
    paths = ZkPaths(zk_root)
    unknown = send_command(zk, paths, node.id, "explode")
    expired = send_command(zk, paths, node.id, COMMAND_DRAIN, ttl_s=-1)
    assert wait_consumed(zk, unknown, 5) and wait_consumed(zk, expired, 5)
    assert node.agent.state == "inservice"
    assert wait_consumed(zk, send_command(zk, paths, node.id, COMMAND_DRAIN), 5)
    assert node.agent.state == "draining"


def test_close_commands_waiting_on_a_stuck_origin_never_hold_back_stats_and_listings(make_app, make_node,
                                                                                    monkeypatch):
    import time

    from streammanager import commands_api
    from streammanager.front import ApiFront
    from tests.conftest import asgi_get

    monkeypatch.setattr(commands_api, "CLOSE_WAIT_S", 3.0)
    app = make_app()
    node = make_node("origin", "us-east-1")
    wait_for_nodes(app.test_client(), 1)
    publish(app.test_client(), node, "stuck")
    node.agent.commands.stop()  # the origin takes no command (its agent is stuck)
    front = ApiFront(app, threads=2)

    def post_close() -> int:
        return asgi_call(front, "POST", "/commands/close",
                         ((b"x-streaming-channel", b"live/stuck"), (b"x-streaming-id", b"*")))[0]

    statuses = []
    closers = [threading.Thread(target=lambda: statuses.append(post_close())) for _ in range(2)]
    for thread in closers:
        thread.start()
    time.sleep(0.5)  # both closes wait for the origin now
    status, _, _ = asgi_get(front, f"{P}/event/live/stuck/stats")
    assert status == 200 and all(t.is_alive() for t in closers)  # answered while both closes still wait
    for thread in closers:
        thread.join(10)
    assert statuses == [503, 503]


def test_a_client_guessing_the_commands_credentials_fills_no_log(make_app, caplog):
    import logging

    api = make_app(commands_auth=HttpAuth("Bearer", token="cmd-token")).test_client()
    caplog.set_level(logging.INFO, logger="streammanager.commands_api")
    for i in range(30):
        assert close(api, "live/any", "*", f"Bearer guess-{i}").status_code == 401
    refused = [r for r in caplog.records if "refused a command" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
