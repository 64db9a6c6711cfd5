"""Protocol v1, pure: every event parses from what the encoder writes, and bad lines get a typed reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.lifecycle import protocol
from exporter.lifecycle.protocol import MAX_LINE, REASONS, Invalid, Message, encode, event_time, parse
from exporter.lifecycle.tracker import Bye, Exited, Hello, Ready, Stopping


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (encode("hello", pid=7, host="pod-a", server_id="3f2a-uuid", shutdown_timeout=8, time=100.5,
                started_at=99.0),
         Hello(4, pid=7, host="pod-a", server_id="3f2a-uuid", shutdown_timeout=8.0, started_at=99.0)),
        (encode("hello", pid=1, host="h"), Hello(4, pid=1, host="h")),
        (encode("ready", time=101.0), Ready(4)),
        (encode("stopping", signal="SIGTERM", time=102.0), Stopping(4, "SIGTERM")),
        (encode("stopping"), Stopping(4, None)),
        (encode("exited", code=0), Exited(4, code=0)),
        (encode("exited", code=3), Exited(4, code=3)),
        (encode("exited", signal="SIGKILL"), Exited(4, signal="SIGKILL")),
        (encode("bye"), Bye(4)),
    ],
)
def test_what_the_encoder_writes_parses_back(line, event):
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    result = parse(line, 4)
    assert isinstance(result, Message), result
    assert result.event == event
    assert result.time == json.loads(line).get("time")


def test_unknown_fields_are_ignored_and_crlf_is_accepted():
    result = parse(b'{"event":"ready","future_field":[1,2],"time":5}\r\n', 1)
    assert result == Message(Ready(1), 5.0)


@pytest.mark.parametrize(
    ("line", "reason", "says"),
    [
        (b"hello", "not_json", "not JSON"),
        (b"", "not_json", "not JSON"),
        (b'{"event":"ready"', "not_json", "not JSON"),
        (b"[1,2]", "not_json", "not a JSON object: a array"),
        (b'"ready"', "not_json", "a string"),
        (b'{"event":"stopping","time":NaN}', "not_json", "NaN"),
        (b'{"event":"stopping","time":Infinity}', "not_json", "Infinity"),
        (b"[" * 30_000 + b"]" * 30_000, "not_json", "nested too deeply"),
        (b'{"event":"exited","code":' + b"9" * 5000 + b"}", "not_json", "not JSON"),
        (b"\xff\xfe\x00binary", "binary", "not UTF-8"),
        (b'{"event":"r\xe9ady"}', "binary", "not UTF-8"),
        (b'{"event":"launch"}', "unknown_event", "unknown event 'launch'"),
        (b'{"event":"HELLO"}', "unknown_event", "unknown event"),
        (b'{"kind":"hello"}', "invalid_field", "'event' must be a string, got null"),
        (b'{"event":7}', "invalid_field", "'event' must be a string, got number"),
        (b'{"event":"hello","pid":1,"host":"h"}', "invalid_field", "needs 'protocol'"),
        (b'{"event":"hello","protocol":"1","pid":1,"host":"h"}', "invalid_field", "'protocol' must be an integer"),
        (b'{"event":"hello","protocol":true,"pid":1,"host":"h"}', "invalid_field", "'protocol' must be an integer"),
        (b'{"event":"hello","protocol":2,"pid":1,"host":"h"}', "unsupported_protocol", "protocol 2"),
        (b'{"event":"hello","protocol":1,"pid":"7","host":"h"}', "invalid_field", "'pid' must be an integer, got string"),
        (b'{"event":"hello","protocol":1,"pid":7.5,"host":"h"}', "invalid_field", "'pid' must be an integer"),
        (b'{"event":"hello","protocol":1,"pid":0,"host":"h"}', "invalid_field", "'pid' must be from 1"),
        (b'{"event":"hello","protocol":1,"pid":2147483648,"host":"h"}', "invalid_field", "'pid' must be from 1"),
        (b'{"event":"hello","protocol":1,"pid":1}', "invalid_field", "'host' must be a string, got null"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":""}', "invalid_field", "'host' must be 1 to 255"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"a\\nb"}', "invalid_field", "printable"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"' + b"h" * 256 + b'"}', "invalid_field", "1 to 255"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"h","server_id":"a:b"}', "invalid_field", "':'"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"h","server_id":5}', "invalid_field", "'server_id' must be a string"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"h","shutdown_timeout":-1}', "invalid_field", "out of range"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"h","shutdown_timeout":"8s"}', "invalid_field", "must be a number"),
        (b'{"event":"hello","protocol":1,"pid":1,"host":"h","started_at":0}', "invalid_field", "out of range"),
        (b'{"event":"stopping","signal":15}', "invalid_field", "'signal' must be a string"),
        (b'{"event":"exited"}', "invalid_field", "exactly one of"),
        (b'{"event":"exited","code":0,"signal":"SIGKILL"}', "invalid_field", "exactly one of"),
        (b'{"event":"exited","code":256}', "invalid_field", "'code' must be from 0 to 255"),
        (b'{"event":"exited","code":false}', "invalid_field", "'code' must be an integer"),
        (b'{"event":"ready","time":"now"}', "invalid_field", "'time' must be a number"),
        (b'{"event":"ready","time":-5}', "invalid_field", "out of range"),
        (b'{"event":"ready","time":1e400}', "invalid_field", "out of range"),
        (b'{"event":"ready","time":' + b"9" * 400 + b"}", "invalid_field", "out of range"),
        (b'{"event":"ready","pad":"' + b"x" * MAX_LINE + b'"}', "oversized", "at most 65536"),
    ],
    ids=lambda v: repr(v[:40]) if isinstance(v, bytes) else None,
)
def test_bad_lines_are_rejected_with_a_reason_and_a_short_detail(line, reason, says):
    result = parse(line, 1)
    assert isinstance(result, Invalid), result
    assert (result.reason, says in result.detail) == (reason, True), result.detail
    assert len(result.detail) < 200 and result.detail.isprintable()


def test_a_line_of_exactly_the_limit_is_accepted():
    head = b'{"event":"ready","pad":"'
    line = head + b"x" * (MAX_LINE - len(head) - 2) + b'"}'
    assert len(line) == MAX_LINE
    assert parse(line + b"\n", 1) == Message(Ready(1))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                              | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(["event", "protocol", "pid", "host",
                                                                 "code", "signal", "time", "x"]),
                                                inner, max_size=6),
                              max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_no_input_raises_and_every_rejection_has_a_known_reason(line):
    result = parse(line, 1)
    assert isinstance(result, (Message, Invalid))
    if isinstance(result, Invalid):
        assert result.reason in REASONS


def test_event_time_trusts_the_sender_only_into_the_past_and_in_order():
    assert event_time(None, 100.0, None) == 100.0          # no claim: when received
    assert event_time(90.0, 100.0, None) == 90.0           # buffered: when it happened
    assert event_time(130.0, 100.0, None) == 100.0         # never in the future
    assert event_time(80.0, 100.0, 95.0) == 95.0           # never before the previous event
    assert event_time(None, 100.0, 95.0) == 100.0


def test_encoder_refuses_what_the_protocol_has_not():
    with pytest.raises(ValueError):
        encode("launch")
    with pytest.raises(ValueError):
        encode("stopping", time=float("nan"))
    assert json.loads(encode("hello", pid=1, host="h", server_id=None)) == {
        "event": "hello", "protocol": protocol.VERSION, "pid": 1, "host": "h"}
