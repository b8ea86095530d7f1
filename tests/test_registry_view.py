"""The registry view's indexes (origin of each stream, nodes carrying it, role/region slices), driven by
node records as ZooKeeper or the feed deliver them. No ZooKeeper needed: changes are applied directly."""
from streammanager.models import NodeRecord, StreamKey, StreamLoad
from streammanager.registry import RegistryView, ZkPaths

KEY = StreamKey("live", "demo")


def record(node_id, role, streams, updated_ms=1):
    return NodeRecord(id=node_id, group="g", region="us-east-1", role=role, host=f"h-{node_id}", rtmp_port=1935,
                      agent_url="", capacity=100, streams=streams, updated_ms=updated_ms)


def report(view, node):
    view._on_change(node.id, node.to_json())  # noqa: SLF001 (what the cache or the feed calls)


def test_the_first_publisher_is_the_origin_and_the_other_takes_over_when_it_stops_publishing():
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("o1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    report(view, record("o2", "origin", {"live/demo": StreamLoad(0, 0, True, 200)}))
    assert view.origin_of(KEY).id == "o1"
    # o1 still lists the stream (same streams, one entry changed): no longer publishing
    report(view, record("o1", "origin", {"live/demo": StreamLoad(0, 1, False, 100)}, updated_ms=2))
    assert view.origin_of(KEY).id == "o2"
    report(view, record("o2", "origin", {}, updated_ms=2))
    assert view.origin_of(KEY) is None
    assert view.stream_count() == 0


def test_a_report_that_changes_only_counts_keeps_origin_and_carriers():
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("o1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    report(view, record("e1", "edge", {"live/demo": StreamLoad(3, 0, True, 150)}))
    for viewers in (4, 5, 0):
        report(view, record("e1", "edge", {"live/demo": StreamLoad(viewers, 0, True, 150)}, updated_ms=viewers + 2))
        report(view, record("o1", "origin", {"live/demo": StreamLoad(viewers, 1, True, 100)}, updated_ms=viewers + 2))
        assert view.origin_of(KEY).id == "o1"
        assert [c.id for c in view.carriers(KEY, "edge")] == ["e1"]
        assert view.live_stream(KEY).subscribers == 2 * viewers
    assert view.node("e1").updated_ms == 2  # the candidate follows the newest record
    assert [c.used for c in view.candidates("edge", "us-east-1")] == [0]


def test_a_stream_leaving_an_edge_leaves_its_carriers():
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("o1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    report(view, record("e1", "edge", {"live/demo": StreamLoad(3, 0, True, 150), "live/x": StreamLoad(1, 0, True, 1)}))
    report(view, record("e1", "edge", {"live/x": StreamLoad(1, 0, True, 1)}, updated_ms=2))
    assert view.carriers(KEY, "edge") == []
    assert [c.id for c in view.carriers("live/x", "edge")] == ["e1"]
    view._on_change("e1", None)  # noqa: SLF001 (the node's ephemeral record went)
    assert view.carriers("live/x", "edge") == [] and view.node("e1") is None
    assert view.origin_of(KEY).id == "o1"


def test_a_node_turning_from_origin_to_edge_is_no_longer_any_stream_s_origin():
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("n1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    assert view.origin_of(KEY).id == "n1"
    report(view, record("n1", "edge", {"live/demo": StreamLoad(0, 1, True, 100)}, updated_ms=2))
    assert view.origin_of(KEY) is None and view.live_stream(KEY) is None
    assert [c.id for c in view.carriers(KEY, "edge")] == ["n1"]
    report(view, record("n1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}, updated_ms=3))
    assert view.origin_of(KEY).id == "n1"


def test_a_record_that_names_another_node_drops_what_the_node_said_before():
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("n1", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    view._on_change("n1", record("other", "origin", {}).to_json())  # noqa: SLF001
    assert view.node("n1") is None and view.origin_of(KEY) is None
    assert view.decode_errors == 1


def test_a_node_whose_id_the_api_refuses_is_not_listed():
    # the dashboard and /admin/node listed it, and /admin/node/<id> answered 400 for it
    view = RegistryView(None, ZkPaths("/t"))
    report(view, record("evil<b>", "origin", {"live/demo": StreamLoad(0, 1, True, 100)}))
    assert view.node("evil<b>") is None and view.node_count() == 0 and view.origin_of(KEY) is None
    assert view.decode_errors == 1
