"""SRS HTTP callbacks, exactly as ``media-server-http-callbacks.md`` shows them, against agents'
hook endpoints: each body accepted with ``0``, the same registry effects as nginx-rtmp's hooks, and stream
keys (from ``param``, ``tcUrl`` or the client's ``on_connect``) verified by the application."""
import pytest

from streammanager.coordinator_config import CallbackTarget, HttpAuth
from tests.conftest import wait_for_nodes, wait_until
from tests.coordinator_helpers import Receiver

P = "/streammanager/api/2.0"

# the specification's table, verbatim
SPEC_BODIES = {
    "on_connect": {"action": "on_connect", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                   "app": "live", "tcUrl": "rtmp://x/x?key=xxx", "pageUrl": "http://x/x.html"},
    "on_close": {"action": "on_close", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                 "app": "live"},
    "on_publish": {"action": "on_publish", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                   "app": "live", "stream": "livestream"},
    "on_unpublish": {"action": "on_unpublish", "client_id": 1985, "ip": "192.168.1.10",
                     "vhost": "video.test.com", "app": "live", "stream": "livestream"},
    "on_play": {"action": "on_play", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                "app": "live", "stream": "livestream"},
    "on_stop": {"action": "on_stop", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                "app": "live", "stream": "livestream"},
}
# the configuration example's on_connect body
CONFIG_CONNECT = {"action": "on_connect", "client_id": 1985, "ip": "192.168.1.10", "vhost": "video.test.com",
                  "app": "live", "tcUrl": "rtmp://video.test.com/live?key=d2fa801d08e3f90ed1e1670e6e52651a",
                  "pageUrl": "http://www.test.com/live.html"}
# the publish log's on_connect (no tcUrl at all)
LOG_CONNECT = {"action": "on_connect", "client_id": 4, "ip": "192.168.1.179", "vhost": "__defaultVhost__",
               "app": "live", "pageUrl": ""}


@pytest.fixture
def receiver():
    server = Receiver()
    server.answer = lambda h: 200 if h.get("x-streaming-key") in ("xxx", "d2fa801d08e3f90ed1e1670e6e52651a",
                                                                   "new-key") else 403
    yield server
    server.close()


@pytest.fixture
def srs_nodes(api, make_node, receiver):
    origin = make_node("origin", "us-east-1", key_verification=CallbackTarget(receiver.url, HttpAuth(), 2.0))
    edge = make_node("edge", "us-east-1")
    wait_for_nodes(api, 2)

    def post(node, body):
        response = node.hooks.post("/hooks/srs", json=body)
        response.text = response.get_data(as_text=True)
        return response
    return origin, edge, post


def allowed(response) -> bool:
    return response.status_code == 200 and response.text == "0"


def live(api, name="livestream"):
    return api.get(f"{P}/event/live/{name}/stats").status_code == 200


def test_every_callback_body_of_the_specification_is_accepted_and_drives_the_registry(api, srs_nodes, receiver):
    origin, edge, post = srs_nodes
    assert allowed(post(origin, SPEC_BODIES["on_connect"]))
    assert allowed(post(origin, SPEC_BODIES["on_publish"]))  # its key came with on_connect's tcUrl
    [verification] = receiver.requests()
    assert (verification["x-streaming-channel"], verification["x-streaming-key"], verification["x-user-ip"]) == \
        ("live/livestream", "xxx", "192.168.1.10")
    wait_until(lambda: live(api), 3, what="the SRS stream live")
    for action in ("on_connect", "on_play"):
        assert allowed(post(edge, SPEC_BODIES[action]))
    wait_until(lambda: api.get(f"{P}/event/live/livestream/stats").get_json()["currentSubscribers"] == 1, 3,
               what="the SRS player counted")
    assert allowed(post(edge, SPEC_BODIES["on_stop"]))
    wait_until(lambda: api.get(f"{P}/event/live/livestream/stats").get_json()["currentSubscribers"] == 0, 3,
               what="the SRS player gone")
    assert allowed(post(edge, SPEC_BODIES["on_close"]))
    assert allowed(post(origin, SPEC_BODIES["on_unpublish"]))
    wait_until(lambda: not live(api), 3, what="the SRS stream gone")
    assert allowed(post(origin, SPEC_BODIES["on_close"]))


def test_on_close_ends_whatever_the_client_held(api, srs_nodes):
    origin, _, post = srs_nodes
    post(origin, SPEC_BODIES["on_connect"])
    assert allowed(post(origin, SPEC_BODIES["on_publish"]))
    wait_until(lambda: live(api), 3, what="live")
    assert allowed(post(origin, SPEC_BODIES["on_close"]))  # a dropped connection: no on_unpublish
    wait_until(lambda: not live(api), 3, what="the stream gone with its client")


def test_the_configuration_examples_on_connect_key_is_verified(api, srs_nodes, receiver):
    origin, _, post = srs_nodes
    assert allowed(post(origin, CONFIG_CONNECT))
    assert allowed(post(origin, SPEC_BODIES["on_publish"]))
    assert receiver.requests()[-1]["x-streaming-key"] == "d2fa801d08e3f90ed1e1670e6e52651a"


@pytest.mark.parametrize("where", ["param", "tcUrl"])
def test_a_bad_key_in_param_or_tcurl_is_refused_with_a_non_zero_answer(api, srs_nodes, receiver, where):
    origin, _, post = srs_nodes
    body = {**SPEC_BODIES["on_publish"], "client_id": "7xy2", "stream": "keyed"}
    body.update({"param": "?key=wrong"} if where == "param" else {"tcUrl": "rtmp://127.0.0.1/live?key=wrong"})
    response = post(origin, body)
    assert response.text != "0" and int(response.text) != 0
    assert receiver.requests()[-1]["x-streaming-key"] == "wrong"
    assert not live(api, "keyed")
    good = {**body, "client_id": "7xy3", "param": "?key=new-key"}
    assert allowed(post(origin, good))  # current SRS: client_id a string, key in param
    wait_until(lambda: live(api, "keyed"), 3, what="the stream with the right key live")


def test_a_publish_without_any_key_is_refused_when_keys_are_verified(api, srs_nodes, receiver):
    origin, _, post = srs_nodes
    assert allowed(post(origin, LOG_CONNECT))
    response = post(origin, {**SPEC_BODIES["on_publish"], "client_id": 4, "ip": "192.168.1.179"})
    assert not allowed(response)
    assert receiver.requests()[-1]["x-streaming-key"] == ""


def test_malformed_srs_bodies_are_400(srs_nodes):
    origin, _, post = srs_nodes
    for body in ({"action": "on_publish", "client_id": 1, "app": "live"},
                 {"action": "on_publish", "client_id": True, "app": "live", "stream": "s"},
                 {"action": "on_publish", "client_id": 1, "app": "live", "stream": "s", "param": 5},
                 {"action": "on_publish", "client_id": 1, "app": "live", "stream": "s", "ip": ["x"]},
                 {"action": "on_dance", "client_id": 1}):
        assert post(origin, body).status_code == 400, body
