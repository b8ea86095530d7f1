"""An edge fences a dead origin (media server and agent both refuse connections) before its session
expires; a live agent is never fenced, and one fenced by mistake registers again by itself."""
import requests

from node_agent.fencing import OriginFence
from streammanager.models import StreamKey
from streammanager.registry import ZkPaths
from tests.conftest import wait_until

P = "/streammanager/api/2.0"


def test_an_origin_whose_agent_answers_is_not_fenced(api, zk, zk_root, spawn_agent):
    _, host, port, node_id = spawn_agent("origin", "us-east-1")  # --media none: nothing on 1935

    form = {"call": "publish", "app": "live", "name": "s1", "clientid": "p", "type": "live"}
    # (a fresh agent may still be settling its ZooKeeper connection: it answers 503 until then)
    wait_until(lambda: requests.post(f"http://{host}:{port}/hooks/nginx", data=form, timeout=5).status_code == 200,
               10, what="the publish accepted")
    fence = OriginFence(zk, ZkPaths(zk_root), "edge-x")
    assert fence.check(StreamKey("live", "s1"), f"{host}:1935") is None
    assert zk.exists(ZkPaths(zk_root).node(node_id))


def test_a_dead_origin_is_fenced_and_a_live_one_fenced_by_mistake_comes_back(api, zk, zk_root, make_node):
    # an in-process agent serves no HTTP and no RTMP: to a peer it looks exactly like a dead node
    origin = make_node("origin", "us-east-1")
    assert origin.publish("s1").status_code == 200
    wait_until(lambda: api.get(f"{P}/event/live/s1/stats").status_code == 200, 5, what="live")
    paths = ZkPaths(zk_root)
    fence = OriginFence(zk, paths, "edge-x")
    # a relay failure from an address the stream no longer uses fences nothing
    assert fence.check(StreamKey("live", "s1"), "127.0.1.250:1935") is None
    assert zk.exists(paths.node(origin.id))
    node_before = zk.exists(paths.node(origin.id)).czxid
    stream_before = zk.exists(paths.stream(StreamKey("live", "s1"))).czxid
    # (a fence backs off when the record changes under it, e.g. the agent's own load report: retry)
    wait_until(lambda: fence.check(StreamKey("live", "s1"), f"{origin.host}:1935") == origin.id, 5,
               what="the fence")
    # the agent is alive after all: it sees its record deleted, registers again and reclaims its stream
    # at once (not at its next heartbeat, a minute away): both records are new znodes

    def recreated():
        node, stream = zk.exists(paths.node(origin.id)), zk.exists(paths.stream(StreamKey("live", "s1")))
        return node and stream and node.czxid != node_before and stream.czxid != stream_before

    wait_until(recreated, 5, what="the agent to register again")
    wait_until(lambda: api.get(f"{P}/event/live/s1/stats").status_code == 200, 5, what="live again")
