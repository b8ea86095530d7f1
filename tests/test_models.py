import json

import pytest

from streammanager.models import (
    NodeRecord,
    RecordError,
    Reservation,
    StreamKey,
    StreamLoad,
    StreamRecord,
    validate_name,
)


def node(**kw):
    base = dict(id="o1", group="g", region="us-east-1", role="origin", host="127.0.1.1", rtmp_port=1935,
                agent_url="http://127.0.1.1:8090", capacity=10)
    base.update(kw)
    return NodeRecord(**base)


def test_a_node_record_survives_its_json_codec_unchanged():
    record = node(streams={"live/a": StreamLoad(3, 1, True, 1700000000000), "live/b": StreamLoad(2, 0, False, 0)},
                  cpu=0.25, updated_ms=5, started_ms=1)
    assert NodeRecord.from_json(record.to_json()) == record


def test_a_record_of_another_schema_version_is_refused_with_the_version_named():
    doc = json.loads(node().to_json())
    doc["schema"] = 99
    with pytest.raises(RecordError, match="schema 99"):
        NodeRecord.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize("data", [b"", b"not json", b"[1,2]", b'{"schema":1}',
                                  b'{"schema":1,"id":"x","group":"g","region":"r","role":"king","host":"h",'
                                  b'"rtmp_port":1935,"capacity":1}'])
def test_garbage_records_raise_record_error_not_anything_else(data):
    with pytest.raises(RecordError):
        NodeRecord.from_json(data)


@pytest.mark.parametrize("cpu", ["nan", "inf", "-inf", "lots"])
def test_a_cpu_load_that_is_not_a_finite_number_is_refused(cpu):
    # float() takes "nan": the admin API would then answer NaN, which is not JSON
    doc = json.loads(node().to_json())
    doc["cpu"] = cpu
    with pytest.raises(RecordError):
        NodeRecord.from_json(json.dumps(doc).encode())


def test_a_stream_load_with_negative_counts_is_refused():
    doc = json.loads(node().to_json())
    doc["streams"] = {"live/a": [-1, 0, 1, 0]}
    with pytest.raises(RecordError):
        NodeRecord.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize("field,value", [("capacity", True), ("rtmp_port", "1935"), ("rtmp_port", True),
                                         ("rtmp_port", 0), ("rtmp_port", 70000), ("agent_url", 123)])
def test_a_node_record_with_a_field_of_the_wrong_type_is_refused(field, value):
    # they were taken (true as a capacity of 1, a number as the agent's URL) and shown by the admin API
    doc = json.loads(node().to_json())
    doc[field] = value
    with pytest.raises(RecordError, match=field):
        NodeRecord.from_json(json.dumps(doc).encode())


def test_a_stream_load_with_more_elements_than_this_release_writes_is_read():
    # what a later release may append: refused, the whole node left every answer during an upgrade
    doc = json.loads(node().to_json())
    doc["streams"] = {"live/a": [3, 1, 1, 1700000000000, "later"], "live/b": [1, 0, 0]}
    with pytest.raises(RecordError):  # fewer than four: not a load
        NodeRecord.from_json(json.dumps(doc).encode())
    del doc["streams"]["live/b"]
    assert NodeRecord.from_json(json.dumps(doc).encode()).streams == {"live/a": StreamLoad(3, 1, True, 1700000000000)}


def test_load_counts_publishers_on_an_origin_and_viewers_on_an_edge():
    streams = {"live/a": StreamLoad(5, 2, True, 1), "live/b": StreamLoad(7, 0, True, 1)}
    assert node(streams=streams).used == 2
    assert node(role="edge", streams=streams).used == 12


def test_stream_and_reservation_records_round_trip():
    assert StreamRecord.from_json(StreamRecord("o1", "abc", 42).to_json()) == StreamRecord("o1", "abc", 42)
    assert Reservation.from_json(Reservation("o1", 99).to_json()) == Reservation("o1", 99)


@pytest.mark.parametrize("name", ["demo", "stream_1", "a.b-c~d", "cam:1@site", "x" * 128])
def test_names_that_fit_one_path_segment_are_accepted(name):
    assert validate_name("stream", name) == name


@pytest.mark.parametrize("name,why", [("", "empty"), (None, "empty"), ("x" * 129, "longer"),
                                      ("a/b", "path segment"), ("a b", "path segment"), (".", "path segment"),
                                      ("..", "path segment"), ("a?b", "path segment"), ("a%2F", "path segment"),
                                      ("caf\u00e9", "path segment"), ("a\nb", "path segment")])
def test_names_that_cannot_be_one_path_segment_are_refused_with_the_reason(name, why):
    with pytest.raises(RecordError, match=why):
        validate_name("stream", name)


def test_a_stream_key_answers_its_scope_with_a_leading_slash():
    key = StreamKey.parse("live/demo")
    assert (key.scope_path, key.name, str(key)) == ("/live", "demo", "live/demo")


def test_decoding_against_the_previous_record_reuses_unchanged_streams_and_sees_changes():
    first = node(streams={"live/a": StreamLoad(1, 0, True, 5), "live/b": StreamLoad(2, 0, True, 5)})
    previous = NodeRecord.from_json(first.to_json())
    changed = node(streams={"live/a": StreamLoad(1, 0, True, 5), "live/b": StreamLoad(3, 0, True, 5),
                            "live/c": StreamLoad(0, 0, True, 9)})
    decoded = NodeRecord.from_json(changed.to_json(), previous)
    assert decoded == changed
    assert decoded.streams["live/a"] is previous.streams["live/a"]  # reused, not rebuilt
    assert decoded.streams["live/b"].subscribers == 3


def test_decoding_against_a_previous_record_still_refuses_a_bad_new_stream():
    previous = NodeRecord.from_json(node(streams={"live/a": StreamLoad(1, 0, True, 5)}).to_json())
    doc = json.loads(previous.to_json())
    doc["streams"]["live/../x"] = [0, 0, 1, 0]
    with pytest.raises(RecordError):
        NodeRecord.from_json(json.dumps(doc).encode(), previous)


def test_a_node_behind_a_public_address_is_relayed_from_its_private_one():
    record = NodeRecord("edge-1", "g", "us-east-1", "edge", "203.0.113.7", 1935, "http://10.0.0.7:8090", 200,
                        private_host="10.0.0.7")
    decoded = NodeRecord.from_json(record.to_json())
    assert decoded.host == "203.0.113.7" and decoded.relay_host == "10.0.0.7"
    plain = NodeRecord.from_json(NodeRecord("o", "g", "us-east-1", "origin", "127.0.1.9", 1935, "", 50).to_json())
    assert plain.relay_host == "127.0.1.9"
