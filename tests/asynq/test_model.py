"""Asynq's registration model: descriptors match asynq.proto (via protoc), members parse, values decode."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from exporter.asynq import model as asynq
from exporter.asynq import proto as asynqpb
from tests.support.tools import require_tool

PROTO = Path(asynq.__file__).with_name("asynq.proto")


def test_descriptors_built_in_code_equal_what_protoc_compiles_from_asynq_proto(tmp_path):
    protoc = require_tool("protoc")
    out = tmp_path / "set.pb"
    subprocess.run([protoc, f"--proto_path={PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name],
                   check=True)
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert compiled == asynqpb.file_descriptor_proto()


def test_server_info_bytes_match_a_hand_encoded_asynq_message():
    # Field by field, as Go's proto.Marshal lays them out: tag, value.
    info = asynq.ServerInfo(host="h", pid=1, server_id="x", concurrency=10, queues={"default": 1},
                            status="active", start_time=100.0, active_worker_count=2)
    expected = bytes.fromhex(
        "0a0168"  # 1: host "h"
        "1001"  # 2: pid 1
        "1a0178"  # 3: server_id "x"
        "200a"  # 4: concurrency 10
        "2a0b0a0764656661756c741001"  # 5: queues {"default": 1}
        "3a06616374697665"  # 7: status "active"
        "42020864"  # 8: start_time {seconds: 100}
        "4802"  # 9: active_worker_count 2
    )
    assert asynq.encode_server_info(info) == expected
    assert asynq.decode_server_info(expected) == info


def test_zero_go_time_decodes_to_none_and_round_trips():
    entry = asynq.SchedulerEntry(id="e", spec="@every 1m", task_type="t", enqueue_options=("Queue(\"q\")",),
                                 next_enqueue_time=1_700_000_000.5, prev_enqueue_time=None)
    raw = asynq.encode_scheduler_entry(entry)
    assert asynqpb.SchedulerEntry.FromString(raw).prev_enqueue_time.seconds == asynq.GO_ZERO_TIME_SECONDS
    assert asynq.decode_scheduler_entry(raw) == entry


def test_worker_info_round_trip():
    w = asynq.WorkerInfo(host="h", pid=3, server_id="s", task_id="t1", task_type="email:send",
                         queue="default", start_time=1.25, deadline=61.0)
    assert asynq.decode_worker_info(asynq.encode_worker_info(w, b"{}")) == w


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("asynq:servers:{pod-a:1:2b9e-11}", ("servers", "pod-a", 1, "2b9e-11")),
        (b"asynq:workers:{pod-a:42:u}", ("workers", "pod-a", 42, "u")),
        ("asynq:schedulers:{::1:7:id}", ("schedulers", "::1", 7, "id")),  # IPv6-ish host with colons
    ],
)
def test_parse_member(raw, expected):
    m = asynq.parse_member(raw)
    assert (m.set, m.host, m.pid, m.ident) == expected
    assert asynq.parse_member(m.key) == m


@pytest.mark.parametrize("raw", ["asynq:servers:h:1:x", "asynq:servers:{h:x}", "asynq:servers:{h:one:x}",
                                 "other:{h:1:x}", b"\xff\xfe", "asynq:servers:{h:1:}"])
def test_bad_members_are_undecodable(raw):
    with pytest.raises(asynq.UndecodableError):
        asynq.parse_member(raw)


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05ab", "not bytes"])
def test_bad_protobuf_is_undecodable(raw):
    with pytest.raises(asynq.UndecodableError):
        asynq.decode_server_info(raw)


def test_member_pattern_escapes_glob_characters():
    assert asynq.member_pattern("servers", "pod[1]*", 7) == r"asynq:servers:{pod\[1\]\*:7:*}"
