"""The 2.0 API against a real ZooKeeper with simulated nodes (in-process agents, ``--media none``)."""
import json
import logging
import re
import time

import pytest

from streammanager.models import Reservation, StreamKey
from streammanager.registry import now_ms
from tests.conftest import asgi_get, wait_for_nodes, wait_until

P = "/streammanager/api/2.0"


@pytest.fixture
def cluster(api, make_node):
    """An origin and an edge in each of two regions."""
    nodes = {
        "us_origin": make_node("origin", "us-east-1"),
        "us_edge": make_node("edge", "us-east-1"),
        "eu_origin": make_node("origin", "eu-west-1"),
        "eu_edge": make_node("edge", "eu-west-1"),
    }
    wait_for_nodes(api, 4)
    return nodes


def lookup(api, name, action, **params):
    query = "&".join([f"action={action}"] + [f"{k}={v}" for k, v in params.items()])
    return api.get(f"{P}/event/live/{name}?{query}")


def assert_error(response, status, fragment=""):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"errorMessage", "timestamp"}
    assert isinstance(body["timestamp"], int) and body["timestamp"] > 1_600_000_000_000
    assert fragment in body["errorMessage"]


def test_broadcast_answers_an_origin_in_the_requested_region(api, cluster):
    response = lookup(api, "demo", "broadcast", region="eu-west-1")
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == "demo" and body["scope"] == "/live" and body["region"] == "eu-west-1"
    assert body["serverAddress"] == cluster["eu_origin"].host
    assert body["rtmpUrl"] == f"rtmp://{cluster['eu_origin'].host}/live/demo"


def test_subscribe_finds_the_edge_in_the_viewers_region_for_a_stream_published_elsewhere(api, cluster):
    assert cluster["us_origin"].publish("show").status_code == 200
    wait_until(lambda: api.get(f"{P}/event/live/show/stats").status_code == 200, what="stream live")
    body = lookup(api, "show", "subscribe", region="eu-west-1").get_json()
    assert (body["serverAddress"], body["region"], body["scope"]) == (cluster["eu_edge"].host, "eu-west-1", "/live")


def test_the_1_0_prefix_is_an_alias(api, cluster):
    assert api.get("/streammanager/api/1.0/event/live/demo?action=broadcast").status_code == 200
    assert api.get("/streammanager/api/1.0/event/list").status_code == 200


def test_stats_count_players_on_every_edge_and_follow_play_and_stop(api, cluster):
    cluster["us_origin"].publish("match")
    wait_until(lambda: api.get(f"{P}/event/live/match/stats").status_code == 200, what="stream live")
    before = time.time() * 1000
    for edge, viewer in (("us_edge", "v1"), ("eu_edge", "v2"), ("eu_edge", "v3")):
        assert cluster[edge].play("match", clientid=viewer).status_code == 200

    def subscribers():
        return api.get(f"{P}/event/live/match/stats").get_json()["currentSubscribers"]

    wait_until(lambda: subscribers() == 3, timeout_s=2.0, what="3 subscribers within 2 s")
    stats = api.get(f"{P}/event/live/match/stats").get_json()
    assert stats["serverAddress"] == cluster["us_origin"].host and stats["region"] == "us-east-1"
    assert stats["startTime"] <= before and stats["startTime"] > before - 60_000
    cluster["eu_edge"].hook("play_done", "match", clientid="v2")
    wait_until(lambda: subscribers() == 2, timeout_s=2.0, what="2 subscribers after a stop")


def test_list_and_list_stats_show_live_streams_only(api, cluster):
    assert api.get(f"{P}/event/list").get_json() == []
    cluster["us_origin"].publish("a")
    cluster["eu_origin"].publish("b", clientid="pub-b")
    wait_until(lambda: len(api.get(f"{P}/event/list").get_json()) == 2, what="two streams listed")
    listed = api.get(f"{P}/event/list").get_json()
    assert {(s["name"], s["scope"], s["region"]) for s in listed} == {("a", "/live", "us-east-1"),
                                                                      ("b", "/live", "eu-west-1")}
    assert all(set(s) == {"name", "scope", "serverAddress", "region"} for s in listed)
    with_stats = api.get(f"{P}/event/list/stats").get_json()
    assert all(s["currentSubscribers"] == 0 and s["startTime"] > 0 for s in with_stats)


def test_unpublish_removes_the_stream_from_every_lookup(api, cluster):
    cluster["us_origin"].publish("brief", clientid="p")
    wait_until(lambda: api.get(f"{P}/event/live/brief/stats").status_code == 200, what="live")
    cluster["us_origin"].hook("publish_done", "brief", clientid="p")
    wait_until(lambda: api.get(f"{P}/event/live/brief/stats").status_code == 404, what="gone")
    assert_error(lookup(api, "brief", "subscribe"), 404, "not live")


def test_a_second_publisher_of_a_live_stream_is_refused_and_its_exit_ends_nothing(api, cluster):
    assert cluster["us_origin"].publish("solo", clientid="first").status_code == 200
    assert cluster["us_origin"].publish("solo", clientid="second").status_code == 403
    refused = cluster["eu_origin"].publish("solo", clientid="elsewhere")
    assert refused.status_code == 403 and b"already live" in refused.data
    cluster["us_origin"].hook("publish_done", "solo", clientid="second")
    cluster["eu_origin"].hook("publish_done", "solo", clientid="elsewhere")
    time.sleep(0.7)
    assert api.get(f"{P}/event/live/solo/stats").status_code == 200


def test_broadcast_of_a_live_stream_answers_its_origin(api, cluster):
    cluster["eu_origin"].publish("here")
    wait_until(lambda: api.get(f"{P}/event/live/here/stats").status_code == 200, what="live")
    body = lookup(api, "here", "broadcast", region="us-east-1").get_json()
    assert body["serverAddress"] == cluster["eu_origin"].host


def test_repeated_broadcast_lookups_for_a_new_stream_agree_on_one_origin(make_app, make_node):
    a, b = make_app().test_client(), make_app().test_client()  # two API servers, two sessions
    for _ in range(4):
        make_node("origin", "us-east-1")
    wait_for_nodes(a, 4)
    wait_for_nodes(b, 4)
    answers = {lookup(client, "new-show", "broadcast").get_json()["serverAddress"]
               for client in (a, b, a, b, a, b)}
    assert len(answers) == 1


def test_a_burst_of_subscribers_spreads_over_edges_before_any_load_report(api, make_node):
    origin = make_node("origin", "us-east-1")
    edges = [make_node("edge", "us-east-1", capacity=5, report_interval_s=30) for _ in range(3)]
    origin.publish("popular")
    wait_for_nodes(api, 4)
    wait_until(lambda: api.get(f"{P}/event/live/popular/stats").status_code == 200, what="live")
    answers = [lookup(api, "popular", "subscribe", region="us-east-1") for _ in range(15)]
    assert all(r.status_code == 200 for r in answers)
    counts = {e.host: sum(r.get_json()["serverAddress"] == e.host for r in answers) for e in edges}
    assert sorted(counts.values()) == [5, 5, 5]
    assert_error(lookup(api, "popular", "subscribe", region="us-east-1"), 400, "at capacity")


def test_a_region_without_nodes_falls_back_to_the_nearest_one_unless_strict(api, cluster):
    cluster["us_origin"].publish("far")
    wait_until(lambda: api.get(f"{P}/event/live/far/stats").status_code == 200, what="live")
    near = lookup(api, "far", "subscribe", region="eu-west-2").get_json()
    assert near["region"] == "eu-west-1"  # London's nearest region with an edge is Ireland
    assert_error(lookup(api, "far", "subscribe", region="eu-west-2", strict="true"), 400, "strict")
    assert lookup(api, "x", "broadcast", region="us-east-2").get_json()["region"] == "us-east-1"


def test_strict_refuses_a_broadcast_whose_stream_has_its_origin_in_another_region(api, cluster):
    # reserved by a first lookup in us-east-1: a strict lookup in eu-west-1 must not answer us-east-1
    assert lookup(api, "pending", "broadcast", region="us-east-1").get_json()["region"] == "us-east-1"
    assert_error(lookup(api, "pending", "broadcast", region="eu-west-1", strict="true"), 400,
                 "is reserved on an origin in region us-east-1, not in eu-west-1 (strict)")
    assert lookup(api, "pending", "broadcast", region="eu-west-1").get_json()["region"] == "us-east-1"
    assert lookup(api, "pending", "broadcast", region="us-east-1", strict="true").get_json()["region"] == "us-east-1"
    cluster["us_origin"].publish("onair")
    wait_until(lambda: api.get(f"{P}/event/live/onair/stats").status_code == 200, what="live")
    assert_error(lookup(api, "onair", "broadcast", region="eu-west-1", strict="true"), 400,
                 "is live on an origin in region us-east-1, not in eu-west-1 (strict)")
    assert lookup(api, "onair", "broadcast", region="eu-west-1").get_json()["serverAddress"] == cluster["us_origin"].host


def test_a_draining_node_gets_no_new_subscribers(api, make_node):
    origin = make_node("origin", "us-east-1")
    draining = make_node("edge", "us-east-1")
    open_edge = make_node("edge", "us-east-1")
    draining.agent.state = "draining"
    draining.agent.changed()
    origin.publish("s")
    wait_for_nodes(api, 3)
    wait_until(lambda: api.get(f"{P}/admin/node/{draining.id}?accessToken=s3cret-token").get_json()["state"]
               == "draining", what="draining state in the view")
    wait_until(lambda: api.get(f"{P}/event/live/s/stats").status_code == 200, what="live")
    hosts = {lookup(api, "s", "subscribe").get_json()["serverAddress"] for _ in range(10)}
    assert hosts == {open_edge.host}


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,status,fragment", [
    (f"{P}/event/live/demo", 400, "missing action"),
    (f"{P}/event/live/demo?action=", 400, "missing action"),
    (f"{P}/event/live/demo?action=delete", 400, "unknown action"),
    (f"{P}/event/live/{'x' * 200}?action=broadcast", 400, "longer than"),
    (f"{P}/event/live/a%20b?action=broadcast", 400, "path segment"),
    (f"{P}/event/live/a%2Fb?action=broadcast", 400, "one path segment"),
    (f"{P}/event/live/match..final?action=broadcast", 400, "holds '..'"),  # nginx-rtmp's HLS refuses it
    (f"{P}/event/li%3Fve/demo?action=broadcast", 400, "path segment"),
    (f"{P}/event/live/demo?action=broadcast&region=atlantis-9", 400, "unknown region"),
    (f"{P}/event/live/demo?action=broadcast&strict=maybe", 400, "strict"),
    (f"{P}/event/live/nobody?action=subscribe", 404, "not live"),
    (f"{P}/event/live/nobody/stats", 404, "not live"),
    (f"{P}/nothing/here", 404, "no such resource"),
    ("/streammanager/api/3.0/event/list", 404, "no such resource"),
    # empty names: never a redirect that merges the slashes into another resource's path
    (f"{P}/event/live//stats", 400, "cannot be empty"),
    (f"{P}/event//demo/stats", 400, "cannot be empty"),
    (f"{P}/event//demo?action=subscribe", 400, "cannot be empty"),
    (f"{P}/event/live/?action=subscribe", 400, "cannot be empty"),
    (f"{P}/event/?action=subscribe", 400, "cannot be empty"),
    (f"/streammanager/api/2.0//event/live/demo?action=subscribe", 404, "no such resource"),
])
def test_bad_input_gets_a_clear_error_in_the_documented_shape(api, cluster, path, status, fragment):
    assert_error(api.get(path), status, fragment)


def test_no_node_able_to_take_the_request_says_why(api, make_node):
    make_node("origin", "us-east-1", capacity=1).publish("only")
    wait_for_nodes(api, 1)
    wait_until(lambda: api.get(f"{P}/event/live/only/stats").status_code == 200, what="live")
    assert_error(lookup(api, "other", "broadcast"), 400, "at capacity")
    assert_error(lookup(api, "only", "subscribe"), 400, "no edge")


# -- admin ------------------------------------------------------------------------------------------
def test_admin_node_lists_every_node_with_role_region_state_capacity_load_and_streams(api, cluster):
    cluster["us_origin"].publish("n1")
    cluster["us_edge"].play("n1", clientid="v")
    def edge_doc():
        return api.get(f"{P}/admin/node/{cluster['us_edge'].id}?accessToken=s3cret-token").get_json()
    wait_until(lambda: edge_doc()["subscribers"] == 1, what="edge load in the view")
    nodes = api.get(f"{P}/admin/node?accessToken=s3cret-token").get_json()
    assert {n["id"] for n in nodes} == {n.id for n in cluster.values()}
    edge = edge_doc()
    assert (edge["role"], edge["region"], edge["state"], edge["capacity"]) == ("edge", "us-east-1", "inservice", 200)
    assert edge["load"] == pytest.approx(1 / 200)
    assert edge["streams"] == [{"name": "n1", "scope": "/live", "subscribers": 1, "relays": 0,
                                "publishing": False, "startTime": 0}]
    assert edge["agentUrl"].startswith("http://127.0.1.")
    assert_error(api.get(f"{P}/admin/node/nope?accessToken=s3cret-token"), 404, "no node")


@pytest.mark.parametrize("query", ["", "?accessToken=", "?accessToken=wrong", "?accessToken=s3cret-token-x"])
def test_admin_calls_refuse_a_missing_or_wrong_token(api, cluster, query):
    refused = api.get(f"{P}/admin/node{query}")
    assert_error(refused, 401, "accessToken")
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="streammanager"'
    assert_error(api.delete(f"{P}/admin/event{query}"), 401, "accessToken")


@pytest.mark.parametrize("header", ["Bearer s3cret-token", "bearer s3cret-token", "BEARER  s3cret-token"])
def test_the_token_is_accepted_as_a_bearer_credential_of_any_case(api, cluster, header):
    assert api.get(f"{P}/admin/node", headers={"Authorization": header}).status_code == 200
    assert api.get(f"{P}/admin/node?accessToken=", headers={"Authorization": header}).status_code == 200
    assert_error(api.get(f"{P}/admin/node", headers={"Authorization": header + "x"}), 401, "invalid")
    assert_error(api.get(f"{P}/admin/node", headers={"Authorization": "Basic s3cret-token"}), 401, "missing")


def test_without_an_access_token_configured_every_admin_call_is_refused(make_app):
    api = make_app(access_token=None).test_client()
    for call in (api.get(f"{P}/admin/node?accessToken=anything"), api.delete(f"{P}/admin/event?accessToken=x"),
                 api.get(f"{P}/admin/node/x?accessToken=")):
        assert_error(call, 403, "disabled")


def test_delete_admin_event_clears_stream_entries_and_answers_count(api, cluster, zk, zk_root):
    lookup(api, "reserved-only", "broadcast")
    assert zk.get_children(f"{zk_root}/v1/reservations") == ["live"]
    response = api.delete(f"{P}/admin/event?accessToken=s3cret-token")
    assert response.status_code == 200
    body = response.get_json()
    assert body["count"] == 0 and body["timestamp"] > 1_600_000_000_000
    assert zk.get_children(f"{zk_root}/v1/reservations") == []
    # a stale claim (its node gone without closing its session) is what the call is for
    zk.create(f"{zk_root}/v1/streams/live/stale", b'{"schema": 1, "node_id": "gone", "session_id": "s", "start_ms": 1}',
              makepath=True)
    # garbage that no agent writes (a claim with a child) is left, and does not stop the rest
    zk.create(f"{zk_root}/v1/streams/live/deep/extra", b"", makepath=True)
    assert api.delete(f"{P}/admin/event?accessToken=s3cret-token").get_json()["count"] == 1
    assert zk.exists(f"{zk_root}/v1/streams/live/stale") is None
    assert zk.exists(f"{zk_root}/v1/streams/live/deep/extra") is not None


def test_delete_admin_event_does_not_change_publishing(api, cluster, zk, zk_root):
    # The specification: the call "does not change the actual state (publishing) of a stream". Origins
    # still publishing claim their streams again at once: they stay live, on the same origin, and a
    # second encoder elsewhere is still refused.
    cluster["us_origin"].publish("one", clientid="p1")
    cluster["eu_origin"].publish("two", clientid="p2")
    wait_until(lambda: len(api.get(f"{P}/event/list").get_json()) == 2, 5, what="both streams listed")
    response = api.delete(f"{P}/admin/event?accessToken=s3cret-token")
    assert response.status_code == 200 and response.get_json()["count"] == 2

    def claimed():
        return sorted(zk.get_children(f"{zk_root}/v1/streams/live")) == ["one", "two"] \
            if zk.exists(f"{zk_root}/v1/streams/live") else False
    wait_until(claimed, 5, what="the origins to claim their streams again")
    wait_until(lambda: lookup(api, "one", "subscribe", region="eu-west-1").status_code == 200, 5,
               what="stream one live again in the view")
    answer = lookup(api, "one", "broadcast", region="eu-west-1").get_json()
    assert answer["serverAddress"] == cluster["us_origin"].host  # still its origin
    assert cluster["eu_origin"].publish("one", clientid="p3").status_code == 403  # a second encoder
    assert cluster["eu_edge"].play("two", clientid="v1").status_code == 200
    # and the claims are watched again: a second clear is undone as well
    assert api.delete(f"{P}/admin/event?accessToken=s3cret-token").get_json()["count"] == 2
    wait_until(claimed, 5, what="the origins to claim their streams a second time")
    # an unpublished stream is not claimed again
    cluster["us_origin"].hook("publish_done", "one", clientid="p1")
    wait_until(lambda: zk.get_children(f"{zk_root}/v1/streams/live") == ["two"], 5, what="one released")
    time.sleep(1.0)
    assert zk.get_children(f"{zk_root}/v1/streams/live") == ["two"]


def test_healthz_reports_the_view(api, cluster):
    body = api.get("/healthz").get_json()
    assert body["status"] == "ok" and body["zookeeper"] == "connected" and body["viewAgeMs"] == 0
    assert body["nodes"] == 4


def metric(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_count_every_lookup_and_time_it(api, cluster):
    """Lookups add to the metrics in batches (streammanager.lookupstats): a scrape still counts each one."""
    before = api.get("/metrics").get_data(as_text=True)
    for name in ("m1", "m2", "m3"):
        assert lookup(api, name, "broadcast").status_code == 200
    assert lookup(api, "absent", "subscribe").status_code == 404
    text = api.get("/metrics").get_data(as_text=True)
    ok, missing = 'sm_lookups_total{action="broadcast",outcome="ok"}', \
        'sm_lookups_total{action="subscribe",outcome="not_found"}'
    assert metric(text, ok) - metric(before, ok) == 3
    assert metric(text, missing) - metric(before, missing) == 1
    timed = 'sm_lookup_seconds_count{action="broadcast"}'
    assert metric(text, timed) - metric(before, timed) == 3
    slowest = 'sm_lookup_seconds_bucket{action="broadcast",le="+Inf"}'
    assert metric(text, slowest) - metric(before, slowest) == 3
    assert metric(text, 'sm_lookup_seconds_sum{action="broadcast"}') > metric(before, 'sm_lookup_seconds_sum{action="broadcast"}')
    assert "sm_view_nodes 4.0" in text


def test_metrics_count_the_registry_changes_the_view_applied(api, cluster):
    def applied() -> float:
        text = api.get("/metrics").get_data(as_text=True)
        return float(re.search(r"^sm_view_changes_total (\S+)$", text, re.M).group(1))

    before = applied()
    assert cluster["eu_origin"].publish("churn").status_code == 200
    wait_until(lambda: applied() > before, 5, what="the origin's new record counted")


def test_a_new_workers_first_load_of_the_registry_is_not_counted_as_changes(api, cluster, zookeeper, zk_root):
    """A restarted worker loads the whole registry: counted as changes, each restart made the counter jump
    by the registry's size (1006 at 1000 nodes), which a rate() over it showed as churn."""
    from streammanager.api import refresh_view_metrics
    from streammanager.registry import RegistryView, ZkPaths, make_client

    def applied() -> float:
        text = api.get("/metrics").get_data(as_text=True)
        return float(re.search(r"^sm_view_changes_total (\S+)$", text, re.M).group(1))

    wait_for_nodes(api, 4)
    before = applied()
    view = RegistryView(make_client(zookeeper.hosts), ZkPaths(zk_root))
    view.start()
    try:
        assert view.wait_initialized(10) and view.node_count() == 4 and view.changes >= 4
        refresh_view_metrics(view)  # what the new worker does every second and at each scrape
        assert applied() == before
        assert cluster["eu_origin"].publish("counted-twice").status_code == 200
        # both views apply the origin's new record: each counts it once
        wait_until(lambda: (refresh_view_metrics(view), applied() >= before + 2)[1], 5, what="both views' change")
    finally:
        view.close()
        view._client.stop()
        view._client.close()


def test_an_agent_serves_metrics_of_its_hooks_and_load(make_node):
    # the agent had no /metrics: a node's hooks, refusals and ZooKeeper state showed only in its log
    from prometheus_client.parser import text_string_to_metric_families

    origin = make_node("origin", "us-east-1", capacity=5)
    assert origin.publish("m", clientid="p1").status_code == 200
    assert origin.publish("m", clientid="p2").status_code == 403  # a second publisher
    for viewer in ("v1", "v2"):
        assert origin.play("m", clientid=viewer).status_code == 200
    assert origin.hook("publish", "bad name!").status_code == 400
    wait_until(lambda: origin.agent.record_bytes > 0 and origin.agent.registered_on_current_session(), 5,
               what="the record written")

    def scrape():
        response = origin.hooks.get("/metrics")
        assert response.status_code == 200 and response.headers["Content-Type"].count("charset") == 1
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.get_data(as_text=True))
                for s in family.samples}
    # the gauge is the size of the last record written: a report may come between a scrape and the check
    samples = wait_until(lambda: (found := scrape())[("sm_agent_record_bytes", ())] == origin.agent.record_bytes
                         and found, 5, what="a scrape with the last record's size")

    def hooks(call, outcome):
        return samples.get(("sm_agent_hooks_total", (("call", call), ("outcome", outcome))), 0)
    assert (hooks("publish", "allowed"), hooks("publish", "refused"), hooks("play", "allowed"),
            hooks("unknown", "malformed")) == (1, 1, 2, 1)
    assert samples[("sm_agent_streams", ())] == 1 and samples[("sm_agent_publishers", ())] == 1
    assert samples[("sm_agent_subscribers", ())] == 2 and samples[("sm_agent_capacity", ())] == 5
    assert samples[("sm_agent_state", (("state", "inservice"),))] == 1
    assert samples[("sm_agent_state", (("state", "draining"),))] == 0
    assert samples[("sm_agent_zookeeper_connected", ())] == 1 and samples[("sm_agent_registered", ())] == 1
    assert samples[("sm_agent_record_bytes", ())] > 0
    assert samples[("sm_agent_report_failures_total", ())] == 0
    assert not any("m" == v for key in samples for _, v in key[1])  # no stream name is a label


def test_an_idle_agent_only_heartbeats_but_reports_a_change_at_once(api, make_node, zk, zk_root):
    node = make_node("edge", "us-east-1", report_interval_s=0.2, heartbeat_interval_s=1.0)
    path = f"{zk_root}/v1/nodes/{node.id}"
    _, first = zk.get(path)
    time.sleep(2.6)
    _, idle = zk.get(path)
    assert 1 <= idle.version - first.version <= 3  # heartbeats, not a rewrite every report interval
    make_node("origin", "us-east-1").publish("hb")
    wait_until(lambda: api.get(f"{P}/event/live/hb/stats").status_code == 200, what="live")
    node.play("hb", clientid="v")
    wait_until(lambda: zk.get(path)[1].version > idle.version and b"live/hb" in zk.get(path)[0], 0.8,
               what="the change reported well before the next heartbeat")


def test_a_publish_reaches_lookups_at_once_even_right_after_a_load_report(api, make_node):
    origin = make_node("origin", "us-east-1", report_interval_s=5.0)
    edge = make_node("edge", "us-east-1", report_interval_s=5.0)
    wait_for_nodes(api, 2)
    origin.publish("first")
    wait_until(lambda: api.get(f"{P}/event/live/first/stats").status_code == 200, 1.0, what="first live")
    edge.play("first", clientid="v1")  # a load change: the edge now coalesces for 5 s
    origin.publish("second", clientid="pub-2")  # right after the origin's last report
    wait_until(lambda: api.get(f"{P}/event/live/second/stats").status_code == 200, 0.5,
               what="the second stream live at once")
    origin.hook("publish_done", "second", clientid="pub-2")
    wait_until(lambda: api.get(f"{P}/event/live/second/stats").status_code == 404, 0.5,
               what="the second stream gone at once")


LOOKUP_VARIANTS = [
    "/streammanager/api/2.0/event/live/s1?action=subscribe&region=eu-west-1",
    "/streammanager/api/1.0/event/live/s1?action=subscribe",
    "/streammanager/api/2.0/event/live/s1?action=broadcast&region=us-east-1&strict=true",
    "/streammanager/api/2.0/event/live/s1?action=subscribe&region=mars-1",
    "/streammanager/api/2.0/event/live/s1?action=subscribe&strict=maybe",
    "/streammanager/api/2.0/event/live/s1?action=subscribe&action=broadcast",
    "/streammanager/api/2.0/event/live/nope?action=subscribe",
    "/streammanager/api/2.0/event/live/s1?action=watch",
    "/streammanager/api/2.0/event/live/s1",
    "/streammanager/api/2.0/event/live/s%20x?action=subscribe",
    "/streammanager/api/2.0/event/live/stats?action=subscribe",
    "/streammanager/api/2.0/event/list/stats",
    "/streammanager/api/2.0/event/list",
    "/streammanager/api/2.0/event/live/s1/stats",
    "/streammanager/api/2.0/event/a/b/c?action=subscribe",
]


@pytest.mark.parametrize("url", LOOKUP_VARIANTS + ["/healthz", "/streammanager/api/2.0/admin/node"])
def test_the_servers_asgi_front_answers_exactly_as_the_flask_routes_do(front, cluster, url):
    """What ``streammanager serve`` runs: lookups and /healthz on the event loop, the rest through Flask."""
    assert cluster["us_origin"].publish("s1").status_code == 200
    flask = front.app.test_client()
    wait_until(lambda: flask.get(f"{P}/event/live/s1/stats").status_code == 200, 5, what="live")
    status, headers, body = asgi_get(front, url)
    expected = flask.get(url)
    assert status == expected.status_code
    assert headers["content-type"] == expected.headers["Content-Type"]
    assert int(headers["content-length"]) == len(body)
    mine, theirs = json.loads(body), expected.get_json()
    for doc in (mine, theirs):
        if isinstance(doc, dict):
            for volatile in ("timestamp", "serverAddress", "rtmpUrl"):  # a clock, a random pick
                doc.pop(volatile, None)
    assert mine == theirs


def test_the_asgi_front_answers_broadcasts_off_the_loop_and_they_agree_on_one_origin(front, cluster):
    """A broadcast for a new stream writes its reservation to ZooKeeper, on a thread of the front's own."""
    answers = {json.loads(asgi_get(front, f"{P}/event/live/fresh?action=broadcast&region=us-east-1")[2])
               ["serverAddress"] for _ in range(5)}
    assert answers == {cluster["us_origin"].host}


def test_the_asgi_front_passes_admin_tokens_to_the_flask_routes(front, cluster):
    assert asgi_get(front, f"{P}/admin/node")[0] == 401
    status, _, body = asgi_get(front, f"{P}/admin/node", ((b"authorization", b"Bearer s3cret-token"),))
    assert status == 200 and len(json.loads(body)) == 4


def test_the_dashboard_shows_regions_nodes_and_live_streams_to_an_admin(api, cluster, make_node):
    assert cluster["us_origin"].publish("show").status_code == 200
    cluster["us_edge"].play("show", clientid="viewer-1")
    make_node("edge", "eu-west-1", group="<b>edge</b>")  # names are text, never markup
    wait_until(lambda: api.get(f"{P}/event/live/show/stats").status_code == 200, 5, what="live")
    wait_for_nodes(api, 5)
    assert api.get("/dashboard").status_code == 401  # node addresses: admin only
    page = api.get("/dashboard?accessToken=s3cret-token")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "us-east-1" in html and "eu-west-1" in html
    assert cluster["us_edge"].id in html and "/live/show" in html and "5 nodes" in html and "3 nodes" in html
    assert "&lt;b&gt;edge&lt;/b&gt;" in html and "<b>edge</b>" not in html
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "http-equiv" not in api.get("/dashboard?accessToken=s3cret-token&refresh=0").get_data(as_text=True)
    assert_error(api.get("/dashboard?accessToken=s3cret-token&refresh=soon"), 400, "refresh")
    assert_error(api.get("/dashboard?accessToken=s3cret-token&refresh=%C2%B2"), 400, "refresh")  # a digit, not ASCII


def test_open_dashboards_share_one_page_and_it_follows_changes(api, cluster, monkeypatch):
    # at 1000 nodes a page is up to two seconds of a worker's CPU: two dashboards reloading took lookups'
    # p99 from 21 to 94 ms. The default page (what auto-refreshing dashboards load) is built once for all
    from streammanager import dashboard

    built = []
    page = dashboard._page
    monkeypatch.setattr(dashboard, "_page", lambda *args: (built.append(1), page(*args))[1])
    wait_for_nodes(api, 4)
    for _ in range(5):
        assert api.get("/dashboard?accessToken=s3cret-token").status_code == 200
    assert len(built) == 1
    assert cluster["us_origin"].publish("later").status_code == 200
    wait_until(lambda: "/live/later" in api.get("/dashboard?accessToken=s3cret-token").get_data(as_text=True), 5,
               what="the new stream on the dashboard")
    built.clear()
    for _ in range(2):  # another refresh than the default: built for each view
        assert api.get("/dashboard?accessToken=s3cret-token&refresh=30").status_code == 200
    assert len(built) == 2


def test_the_shared_dashboard_page_says_so_when_its_worker_loses_zookeeper(api, cluster):
    # the shared page was kept while the view had no change: an outage brings none, so every open
    # dashboard went on saying "connected" (and the same report ages, the same time) all through it
    wait_for_nodes(api, 4)
    assert ">connected<" in api.get("/dashboard?accessToken=s3cret-token").get_data(as_text=True)
    changes = api.application.extensions["sm"].view.changes
    api.application.extensions["sm"].client.stop()  # this worker's session is gone
    wait_until(lambda: "disconnected" in api.get("/dashboard?accessToken=s3cret-token").get_data(as_text=True), 5,
               what="the dashboard saying ZooKeeper is disconnected")
    assert api.application.extensions["sm"].view.changes == changes  # no change of the view said it


def test_the_stream_listings_follow_changes_within_a_second_or_so(api, cluster):
    assert api.get(f"{P}/event/list/stats").get_json() == []  # built, then shared while nothing changes
    assert cluster["us_origin"].publish("fresh").status_code == 200
    wait_until(lambda: [s["name"] for s in api.get(f"{P}/event/list/stats").get_json()] == ["fresh"], 3,
               what="the new stream in the shared listing")
    cluster["us_edge"].play("fresh", clientid="v1")
    wait_until(lambda: api.get(f"{P}/event/list/stats").get_json()[0]["currentSubscribers"] == 1, 3,
               what="the viewer counted in the shared listing")
    cluster["us_origin"].hook("publish_done", "fresh", clientid="pub-1")
    wait_until(lambda: api.get(f"{P}/event/list").get_json() == [], 3, what="the stream gone from the listing")


def test_an_unexpected_failure_in_the_asgi_fronts_lookup_is_answered_in_the_documented_shape(front, cluster,
                                                                                             monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("selection broke")

    monkeypatch.setattr(front.svc.placement, "subscribe", broken)
    status, headers, body = asgi_get(front, f"{P}/event/live/s1?action=subscribe")
    doc = json.loads(body)
    assert status == 500 and headers["content-type"] == "application/json"
    assert set(doc) == {"errorMessage", "timestamp"} and "selection broke" not in doc["errorMessage"]


def test_a_query_of_raw_non_ascii_bytes_gets_a_400_on_every_route_through_the_front(front):
    for url in (f"{P}/event/list?x=\u00e9", f"{P}/event/live/s1?action=subscribe&region=\u00e9", "/healthz?\u00e9"):
        status, headers, body = asgi_get(front, url)
        assert status == 400 and headers["content-type"] == "application/json"
        assert set(json.loads(body)) == {"errorMessage", "timestamp"}


def _expire_session(client, hosts: str) -> int:
    """Expire ``client``'s ZooKeeper session the way a long partition does (a twin client with the same
    session id and password closes it); returns the expired session's id."""
    from kazoo.client import KazooClient

    session_id, password = client.client_id
    twin = KazooClient(hosts=hosts, client_id=(session_id, password))
    twin.start(timeout=10)
    twin.stop()
    twin.close()
    return session_id


def test_after_a_session_expiry_an_origin_claims_its_streams_again_and_an_edge_claims_none(
        api, cluster, zk, zk_root, zookeeper):
    origin, edge = cluster["us_origin"], cluster["us_edge"]
    assert origin.publish("kept", clientid="p1").status_code == 200
    # the edge relays a stream whose origin left: its table holds a publish that is not its to claim
    assert edge.hook("publish", "orphan", clientid="r1", type="live",
                     relaykey=edge.agent.relay_keys.issue(StreamKey("live", "orphan"))).status_code == 200
    for node in (origin, edge):
        expired = _expire_session(node.agent.client, zookeeper.hosts)
        wait_until(lambda: node.agent.client.connected and node.agent.client.client_id[0] != expired
                   and node.agent._registered_session == node.agent.client.client_id[0], 15,
                   what=f"{node.id} back on a new session")
    wait_until(lambda: zk.exists(f"{zk_root}/v1/streams/live/kept") is not None, 5, what="kept claimed again")
    data, _ = zk.get(f"{zk_root}/v1/streams/live/kept")
    assert json.loads(data)["node_id"] == origin.id
    wait_until(lambda: lookup(api, "kept", "subscribe").status_code == 200, 5, what="kept live in the view")
    assert zk.exists(f"{zk_root}/v1/streams/live/orphan") is None
    assert lookup(api, "orphan", "subscribe").status_code == 404


def test_repeated_broadcast_lookups_of_one_new_stream_hold_one_place_on_its_origin(api, make_node):
    # an encoder that looks up again before it publishes (a retry, a reconnect) is one stream, not three
    origin = make_node("origin", "us-east-1", capacity=3, report_interval_s=30)
    wait_for_nodes(api, 1)
    for _ in range(5):
        assert lookup(api, "again", "broadcast").get_json()["serverAddress"] == origin.host
    for name in ("second", "third"):  # two more new streams fit in the three places
        assert lookup(api, name, "broadcast").status_code == 200
    assert_error(lookup(api, "fourth", "broadcast"), 400, "at capacity")
    # every origin looks full now, but a reserved stream is still answered its origin
    for name in ("again", "second", "third"):
        assert lookup(api, name, "broadcast").get_json()["serverAddress"] == origin.host


def test_a_405_names_the_methods_the_resource_takes(api):
    response = api.post(f"{P}/event/list")
    assert_error(response, 405, "not allowed")
    assert {m.strip() for m in response.headers["Allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}


def test_a_wrong_token_is_logged_without_the_token(api, cluster, caplog):
    caplog.set_level(logging.INFO)
    assert_error(api.get(f"{P}/admin/node?accessToken=guess-0123"), 401, "invalid")
    refused = [r.getMessage() for r in caplog.records if "wrong access token" in r.getMessage()]
    assert refused and "/admin/node" in refused[0]
    assert "guess-0123" not in caplog.text and "s3cret-token" not in caplog.text


def test_a_head_lookup_changes_nothing(api, make_node, zk, zk_root):
    # a monitor's HEAD on a broadcast URL reserved the stream and counted against the origin
    from streammanager.models import StreamKey
    from streammanager.registry import ZkPaths

    make_node("origin", "us-east-1", capacity=1, report_interval_s=30)
    wait_for_nodes(api, 1)
    for action in ("broadcast", "subscribe"):
        response = api.head(f"{P}/event/live/probe?action={action}")
        assert response.status_code == 405 and response.headers["Allow"] == "GET"
    assert zk.exists(ZkPaths(zk_root).reservation(StreamKey("live", "probe"))) is None
    assert lookup(api, "real", "broadcast").status_code == 200  # the one place is still free


def test_lookups_no_node_can_take_are_counted_apart_and_logged_once_not_per_lookup(api, cluster, caplog):
    """A strict lookup in a region without edges is a 400, as the 2.0 API answers it, but it is the
    operator's capacity problem: it was counted as a bad request, and every refused lookup logged a line
    (thousands a second exactly when capacity ran out)."""
    assert cluster["us_origin"].publish("full").status_code == 200
    wait_until(lambda: lookup(api, "full", "subscribe").status_code == 200, 5, what="the stream live")
    before = api.get("/metrics").get_data(as_text=True)
    caplog.set_level(logging.INFO, logger="streammanager.placement")
    for _ in range(5):
        assert_error(lookup(api, "full", "subscribe", region="ap-south-1", strict="true"), 400, "no edge")
    assert_error(lookup(api, "full", "subscribe", region="nowhere-1"), 400, "unknown region")
    text = api.get("/metrics").get_data(as_text=True)
    refused = 'sm_lookups_total{action="subscribe",outcome="no_capacity"}'
    bad = 'sm_lookups_total{action="subscribe",outcome="bad_request"}'
    assert metric(text, refused) - metric(before, refused) == 5
    assert metric(text, bad) - metric(before, bad) == 1
    logged = [r for r in caplog.records if r.getMessage().startswith("no node for lookup")]
    assert len(logged) == 1, [r.getMessage() for r in logged]


def test_the_lookup_histogram_tells_apart_lookups_answered_from_memory(api, cluster):
    """A subscribe lookup takes tens of microseconds: with 0.5 ms as the first bound, nearly all of them
    fell in it, so a lookup ten times slower did not show in sm_lookup_seconds."""
    assert cluster["us_origin"].publish("timed").status_code == 200
    wait_until(lambda: lookup(api, "timed", "subscribe").status_code == 200, 5, what="the stream live")
    text = api.get("/metrics").get_data(as_text=True)
    bounds = sorted(float(b) for b in re.findall(r'^sm_lookup_seconds_bucket\{action="subscribe",le="([0-9.e-]+)"\}',
                                                 text, re.M))
    assert bounds[0] <= 0.0001 and len([b for b in bounds if b < 0.0005]) >= 2, bounds
    assert bounds[-1] >= 1.0, bounds  # a broadcast's reservation write may take up to its 1 s timeout


def test_the_dashboard_compiles_its_page_once_not_at_every_view(api, cluster, monkeypatch):
    """render_template_string compiled the page again at every view: tens of milliseconds of the
    worker's CPU, holding the GIL from its lookups, at every refresh of every open dashboard."""
    import jinja2

    compiled = []
    compile_ = jinja2.Environment.compile

    def counting(self, *args, **kwargs):
        compiled.append(1)
        return compile_(self, *args, **kwargs)
    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    first = api.get("/dashboard?accessToken=s3cret-token")
    assert first.status_code == 200
    compiled.clear()
    for _ in range(3):
        page = api.get("/dashboard?accessToken=s3cret-token")
        assert page.status_code == 200 and cluster["us_edge"].id in page.get_data(as_text=True)
    assert compiled == []


def test_a_client_guessing_the_token_fills_no_log(api, cluster, caplog):
    """Each refused admin call logged a warning: a client guessing at thousands of requests a second
    wrote as many lines. The first is logged, the next ones are counted into the next line."""
    caplog.set_level(logging.INFO)
    for i in range(50):
        assert_error(api.get(f"/dashboard?accessToken=guess-{i}"), 401, "invalid")
    refused = [r for r in caplog.records if "wrong access token" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING, [r.getMessage() for r in refused]
    assert "guess-" not in caplog.text


def test_expired_reservations_leave_no_scope_znode_behind(api, cluster, zk, zk_root):
    """Lookups are public: every scope a broadcast lookup named used to stay in ZooKeeper for good."""
    for scope, name in (("app-a", "s1"), ("app-b", "s2"), ("app-b", "s3")):
        assert api.get(f"{P}/event/{scope}/{name}?action=broadcast").status_code == 200
    reservations = f"{zk_root}/v1/reservations"
    assert sorted(zk.get_children(reservations)) == ["app-a", "app-b"]
    placement = api.application.extensions["sm"].placement
    assert placement.expire_reservations(now=now_ms() + 3_600_000) == 3
    assert zk.get_children(reservations) == []
    # a scope removed is made again by the next broadcast lookup
    assert api.get(f"{P}/event/app-a/s4?action=broadcast").status_code == 200
    assert zk.get_children(f"{reservations}/app-a") == ["s4"]


def test_reservations_due_while_zookeeper_is_away_are_expired_once_it_is_back(api, cluster, zk, zk_root):
    """The housekeeper expired them with calls that wait for the connection (holding up the lookup
    metrics' flush for the whole outage), or failed and forgot them: their scope stayed for good."""
    assert api.get(f"{P}/event/away/s1?action=broadcast").status_code == 200
    reservations = f"{zk_root}/v1/reservations"
    placement = api.application.extensions["sm"].placement
    client = placement._client
    client.stop()  # cut off; it comes back on a new session
    try:
        assert placement.expire_reservations(now=now_ms() + 3_600_000) == 0  # at once, and kept for later
    finally:
        client.start(timeout=10)
    assert zk.get_children(f"{reservations}/away") == ["s1"]  # not the session's: it stays until it expires
    assert placement.expire_reservations(now=now_ms() + 3_600_000) == 1
    assert "away" not in zk.get_children(reservations)


def test_a_reservation_outlives_the_worker_that_wrote_it(make_app, make_node, zk, zk_root):
    """A reload (SIGHUP) replaces every worker: a reservation was ephemeral, and went with its worker's
    session, so the stream looked up again before its encoder came got another origin."""
    for _ in range(4):
        make_node("origin", "us-east-1")
    first, second = make_app().test_client(), make_app().test_client()
    for worker in (first, second):
        wait_for_nodes(worker, 4)
    names = [f"reload{i}" for i in range(8)]
    answered = {n: first.get(f"{P}/event/live/{n}?action=broadcast").get_json()["serverAddress"] for n in names}
    assert len(set(answered.values())) > 1  # spread over the origins
    first.application.extensions["sm"].client.stop()  # the old worker exits: its session ends
    again = {n: second.get(f"{P}/event/live/{n}?action=broadcast").get_json()["serverAddress"] for n in names}
    assert again == answered


def test_the_expired_reservations_of_a_worker_that_has_gone_are_swept_by_another(api, cluster, zk, zk_root):
    reservations = f"{zk_root}/v1/reservations"
    placement = api.application.extensions["sm"].placement
    gone = Reservation(cluster["us_origin"].id, now_ms() - 60_000)  # written by a worker that has gone
    zk.create(f"{reservations}/old-app/s1", gone.to_json(), makepath=True)
    assert api.get(f"{P}/event/live/fresh?action=broadcast").status_code == 200  # this worker's own, unexpired
    assert placement.sweep_expired() == 1
    assert zk.get_children(reservations) == ["live"]  # the emptied scope went too; the unexpired one stays


def test_a_node_whose_record_nears_the_zookeeper_limit_takes_no_new_stream(make_node, zk, zk_root):
    """ZooKeeper drops the connection of a request over its jute.maxbuffer (1 MiB by default): an origin
    with some 20 000 streams wrote such a record, then lost its connection at every report, its hooks'
    claims failing with it, and its record went stale. Near --max-record-bytes it takes no new stream."""
    limit = 4000
    origin = make_node("origin", "us-east-1", capacity=10_000, max_record_bytes=limit)
    path = f"{zk_root}/v1/nodes/{origin.id}"
    accepted = []
    for i in range(100):
        name = f"s{i:03d}-" + "x" * 100
        answer = origin.publish(name, clientid=f"c{i}")
        if answer.status_code != 200:
            break
        accepted.append(name)
        wait_until(lambda: name.encode() in zk.get(path)[0], what=f"{name} in the node record")
    assert answer.status_code == 503 and "record" in answer.get_data(as_text=True)
    assert 20 <= len(accepted) < 100
    data = zk.get(path)[0]
    assert len(data) <= limit and all(name.encode() in data for name in accepted)
    # a stream it carries is still answered (a reconnecting encoder's duplicate is refused as before)
    assert origin.play(accepted[0], clientid="v1").status_code == 200
    origin.hook("play_done", accepted[0], clientid="v1")
    origin.hook("publish_done", accepted[0], clientid="c0")
    wait_until(lambda: accepted[0].encode() not in zk.get(path)[0], what="the ended stream gone from the record")
    assert origin.publish("after-one-ended", clientid="late").status_code == 200
