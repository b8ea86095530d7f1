"""Selection is a pure function: these tests replay it with fixed clocks and seeded randomness."""
import random
from collections import Counter

from streammanager.models import NodeRecord, StreamLoad
from streammanager.regions import distance_km
from streammanager.selection import DEFAULT_FILTERS, Candidate, LookupRequest, normalize, sample, select

NOW = 1_800_000_000_000


def make(node_id, role="edge", region="us-east-1", capacity=100, viewers=0, streams=None, state="inservice",
         updated_ms=NOW, group="g"):
    streams = dict(streams or {})
    if viewers:
        streams["live/other"] = StreamLoad(viewers, 0, role == "origin", 1)
    return NodeRecord(id=node_id, group=group, region=region, role=role, host=f"h-{node_id}", rtmp_port=1935,
                      agent_url="", capacity=capacity, state=state, streams=streams, updated_ms=updated_ms)


def choose(nodes, rng=None, **req):
    cands = [Candidate.of(n) for n in nodes]
    req.setdefault("role", "edge")
    req.setdefault("stream_key", "live/demo")
    req.setdefault("now_ms", NOW)

    def candidates_in(region):
        return [c for c in cands if c.node.role == req["role"] and (region is None or c.node.region == region)]

    regions = sorted({c.node.region for c in cands if c.node.role == req["role"]})
    return select(LookupRequest(**req), candidates_in, regions, rng or random.Random(7))


def test_the_least_loaded_edge_wins():
    nodes = [make("busy", viewers=90), make("idle", viewers=5), make("half", viewers=50)]
    picks = Counter(choose(nodes, random.Random(i)).node.id for i in range(50))
    assert set(picks) == {"idle"}


def test_subscribe_prefers_an_edge_already_relaying_the_stream():
    carrying = make("carrying", viewers=40, streams={"live/demo": StreamLoad(10, 0, True, 1)})
    fresh = make("fresh", viewers=0)
    picks = Counter(choose([carrying, fresh], random.Random(i)).node.id for i in range(50))
    assert picks["carrying"] == 50


def test_a_node_at_capacity_is_never_answered_and_the_error_says_so():
    nodes = [make("full1", capacity=10, viewers=10), make("full2", capacity=5, viewers=5)]
    result = choose(nodes, region="us-east-1")
    assert result.node is None
    assert result.removed["capacity"] == 2
    assert "2 at capacity" in result.reason


def test_answers_not_yet_reported_count_against_their_node():
    nodes = [make("a", capacity=10), make("b", capacity=10)]
    assert choose(nodes, pending={"a": 10}).node.id == "b"
    assert choose(nodes, pending={"a": 10, "b": 10}).node is None


def test_draining_and_starting_nodes_are_skipped():
    nodes = [make("draining", state="draining"), make("starting", state="starting"), make("ok", viewers=99)]
    assert choose(nodes).node.id == "ok"
    result = choose(nodes[:2])
    assert result.node is None and "not in service" in result.reason


def test_a_node_with_a_stale_heartbeat_is_skipped():
    nodes = [make("stale", updated_ms=NOW - 60_000), make("fresh", viewers=80)]
    assert choose(nodes, max_heartbeat_age_ms=10_000).node.id == "fresh"


def test_the_requested_region_wins_over_a_less_loaded_one():
    nodes = [make("eu", region="eu-west-1", viewers=80), make("us", region="us-east-1", viewers=0)]
    assert choose(nodes, region="eu-west-1").node.id == "eu"


def test_a_full_region_falls_back_to_the_nearest_region_with_room():
    nodes = [make("dublin", region="eu-west-1", capacity=1, viewers=1),
             make("london", region="eu-west-2", viewers=90),
             make("tokyo", region="ap-northeast-1"),
             make("virginia", region="us-east-1")]
    assert choose(nodes, region="eu-west-1").node.id == "london"


def test_strict_refuses_other_regions():
    nodes = [make("dublin", region="eu-west-1", capacity=1, viewers=1), make("london", region="eu-west-2")]
    result = choose(nodes, region="eu-west-1", strict=True)
    assert result.node is None
    assert "eu-west-1 (strict)" in result.reason


def test_a_subscriber_without_region_is_sent_near_the_origin():
    nodes = [make("tokyo", region="ap-northeast-1"), make("frankfurt", region="eu-central-1", viewers=50)]
    assert choose(nodes, near_region="eu-west-1").node.id == "frankfurt"


def test_only_the_origins_group_serves_its_subscribers():
    nodes = [make("other", group="other"), make("mine", group="g", viewers=90)]
    assert choose(nodes, group="g").node.id == "mine"


def test_a_burst_spreads_over_equally_loaded_nodes():
    nodes = [make(f"e{i}") for i in range(4)]
    picks = Counter(choose(nodes, random.Random(i)).node.id for i in range(200))
    assert len(picks) >= 2  # random among the best few, not always the first


def test_origins_are_chosen_for_broadcast_by_publishers_over_capacity():
    nodes = [make("o1", role="origin", capacity=2, viewers=1), make("o2", role="origin", capacity=50)]
    assert choose(nodes, role="origin").node.id == "o2"


def test_normalize_maps_to_the_unit_interval():
    assert normalize([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert normalize([1.0, 1.0]) == [0.0, 0.0]
    assert normalize([0.0, 1.0, 0.0]) == [0.0, 1.0, 0.0]
    assert normalize([-0.5, -0.25, -1.0], -1.0, -0.25) == [2 / 3, 1.0, 0.0]


def test_distances_rank_neighbours_first():
    assert distance_km("eu-west-1", "eu-west-1") == 0
    assert distance_km("eu-west-1", "eu-west-2") < distance_km("eu-west-1", "us-east-1")
    assert 5000 < distance_km("us-east-1", "eu-west-1") < 6500
    assert distance_km("us-east-1", "unknown-zone") > 40000


def test_in_a_big_region_an_edge_carrying_the_stream_is_still_found():
    nodes = [make(f"e{i}", viewers=10) for i in range(200)]
    carrying = make("carrier", viewers=30, streams={"live/demo": StreamLoad(5, 0, True, 1)})
    cands = [Candidate.of(n) for n in nodes + [carrying]]
    for seed in range(20):
        result = select(LookupRequest(role="edge", stream_key="live/demo", region="us-east-1", now_ms=NOW),
                        lambda region: list(cands), ["us-east-1"], random.Random(seed),
                        preferred=[cands[-1]])
        assert result.node.id == "carrier"


def test_in_a_big_region_a_lone_free_node_is_found_even_when_the_sample_misses_it():
    nodes = [make(f"full{i}", capacity=10, viewers=10) for i in range(300)] + [make("free", capacity=10)]
    for seed in range(10):
        assert choose(nodes, random.Random(seed), region="us-east-1").node.id == "free"
    result = choose(nodes[:300], region="us-east-1")
    assert result.node is None and result.removed["capacity"] == 300


def test_sampled_selection_still_balances_a_big_region():
    nodes = [make(f"e{i}", capacity=1000, viewers=(i % 10) * 90) for i in range(200)]
    picks = [choose(nodes, random.Random(seed), region="us-east-1").node for seed in range(200)]
    assert sum(p.used for p in picks) / len(picks) < 150  # the region's average load is 405


def test_the_sample_gives_every_node_the_same_chance_and_always_its_full_size():
    nodes = [Candidate.of(make(f"e{i}")) for i in range(40)]
    rng = random.Random(7)
    seen = {n.node.id: 0 for n in nodes}
    for _ in range(4000):
        chosen = sample(nodes, (), rng, 16)
        assert len({c.node.id for c in chosen}) == 16  # a window wrapping past the end stays full
        for c in chosen:
            seen[c.node.id] += 1
    expected = 4000 * 16 / 40
    assert all(abs(count - expected) < 0.15 * expected for count in seen.values()), seen


def random_fleet(rng):
    """Nodes with every property a filter or weigher reads drawn at random, ties included."""
    nodes = []
    for i in range(rng.randint(1, 30)):
        capacity = rng.choice((0, 1, 4, 10, 10, 100))
        streams = {"live/demo": StreamLoad(1, 0, False, 1)} if rng.random() < 0.3 else {}
        nodes.append(make(f"n{i}", role=rng.choice(("edge", "edge", "origin")),
                          region=rng.choice(("us-east-1", "eu-west-1", "ap-northeast-1")), capacity=capacity,
                          viewers=rng.choice((0, 0, 1, 5, 9, 10, 50)), streams=streams,
                          state=rng.choice(("inservice", "inservice", "inservice", "draining", "starting")),
                          updated_ms=NOW - rng.choice((0, 0, 0, 180_000, 180_001)), group=rng.choice(("g", "g", "h"))))
    return nodes


def test_the_one_pass_scoring_answers_as_the_filters_and_weighers_do():
    # select() scores the default policy in one pass (selection.score); a list of the default
    # filters (not the same object) takes the filter-by-filter, weigher-by-weigher way.
    rng = random.Random(11)
    compared = answered = 0
    for _ in range(3000):
        cands = [Candidate.of(n) for n in random_fleet(rng)]
        role = rng.choice(("edge", "origin"))
        req = LookupRequest(role, "live/demo", rng.choice((None, "us-east-1", "eu-west-1", "sa-east-1")),
                            rng.random() < 0.3, rng.choice((None, "eu-west-1")), rng.choice((None, "g", "h")),
                            NOW, 180_000, {c.id: rng.randint(0, 3) for c in cands if rng.random() < 0.3})

        def candidates_in(region, role=role, cands=cands):
            return [c for c in cands if c.role == role and (region is None or c.region == region)]

        regions = sorted({c.region for c in cands if c.role == role})
        preferred = [c for c in cands if c.role == role and "live/demo" in c.streams]
        seed = rng.random()
        fused = select(req, candidates_in, regions, random.Random(seed), preferred=preferred, sample_size=4)
        stepwise = select(req, candidates_in, regions, random.Random(seed), list(DEFAULT_FILTERS),
                          preferred=preferred, sample_size=4)
        assert (fused.node and fused.node.id, fused.reason) == (stepwise.node and stepwise.node.id, stepwise.reason)
        compared += 1
        answered += fused.node is not None
    assert 0.3 * compared < answered < 0.9 * compared  # both answers and refusals were compared
