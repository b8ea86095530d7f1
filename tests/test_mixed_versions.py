"""Records written by another version of the software during a rolling upgrade (a newer schema), or
damaged ones: each reader skips what it cannot decode without misreading what it means."""
import orjson

from streammanager.models import StreamKey
from streammanager.registry import UNREADABLE_CLAIM, StreamClaims, ZkPaths
from tests.conftest import wait_until

P = "/streammanager/api/2.0"


def _rewrite_claim_as_newer_schema(zk, zk_root: str, key: StreamKey) -> None:
    path = ZkPaths(zk_root).stream(key)
    doc = orjson.loads(zk.get(path)[0])
    zk.set(path, orjson.dumps({**doc, "schema": doc["schema"] + 1, "added_by_a_newer_agent": True}))


def test_an_unreadable_claim_is_held_by_someone_not_absent(zk, zk_root, make_node):
    origin = make_node("origin", "us-east-1")
    assert origin.publish("s1").status_code == 200
    key = StreamKey("live", "s1")
    claims = StreamClaims(zk, ZkPaths(zk_root))
    assert claims.owner(key).node_id == origin.id
    _rewrite_claim_as_newer_schema(zk, zk_root, key)
    assert claims.owner(key) == UNREADABLE_CLAIM
    assert claims.owner(StreamKey("live", "nobody-publishes-this")) is None


def test_an_edge_plays_a_stream_whose_claim_a_newer_origin_wrote(api, zk, zk_root, make_node):
    # during a rolling upgrade the origins may write claims this (older) edge cannot decode: the
    # stream is live all the same, and the API sends its viewers here
    origin = make_node("origin", "us-east-1")
    edge = make_node("edge", "us-east-1")
    assert origin.publish("s1").status_code == 200
    _rewrite_claim_as_newer_schema(zk, zk_root, StreamKey("live", "s1"))
    wait_until(lambda: api.get(f"{P}/event/live/s1?action=subscribe&region=us-east-1").status_code == 200, 10,
               what="the stream in the API's view")
    answer = api.get(f"{P}/event/live/s1?action=subscribe&region=us-east-1").get_json()
    assert answer["serverAddress"] == edge.host
    assert edge.play("s1").status_code == 200
    # a stream nobody publishes is still refused
    assert edge.play("s2").status_code == 404
