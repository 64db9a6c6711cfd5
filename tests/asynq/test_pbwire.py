"""exporter.asynq.pbwire reads ServerInfo exactly as the protobuf runtime does: on messages protobuf
writes, on hand-made edge cases of the wire format, and on random bytes (both refuse, or both
give the same fields); and serve imports neither protobuf nor --web-config-file's libraries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.asynq import model as asynq
from exporter.asynq import pbwire
from exporter.asynq import proto as asynqpb


def by_protobuf(data: bytes) -> pbwire.ServerInfoFields | None:
    """What the protobuf runtime reads, in pbwire's shape; None when it refuses the bytes."""
    try:
        m = asynqpb.ServerInfo.FromString(data)
    except DecodeError:
        return None
    return pbwire.ServerInfoFields(
        m.host, m.pid, m.server_id, m.concurrency, dict(m.queues), m.strict_priority, m.status,
        (m.start_time.seconds, m.start_time.nanos) if m.HasField("start_time") else None,
        m.active_worker_count)


def by_pbwire(data: bytes) -> pbwire.ServerInfoFields | None:
    """pbwire's reading; its fast reader of the three fields the watcher needs must agree."""
    try:
        fields = pbwire.server_info(data)
    except pbwire.WireError:
        fields = None
    try:
        load = pbwire.server_load(data)
    except pbwire.WireError:
        load = None
    assert load == (None if fields is None else (fields.status, fields.concurrency, fields.active_worker_count))
    return fields


int32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=40)


@st.composite
def server_infos(draw) -> bytes:
    m = asynqpb.ServerInfo(host=draw(text), pid=draw(int32), server_id=draw(text),
                           concurrency=draw(int32), queues=draw(st.dictionaries(text, int32, max_size=4)),
                           strict_priority=draw(st.booleans()), status=draw(text),
                           active_worker_count=draw(int32))
    if draw(st.booleans()):
        m.start_time.seconds = draw(st.integers(-62135596800, 253402300799))
        m.start_time.nanos = draw(st.integers(0, 999_999_999))
    return m.SerializeToString(deterministic=draw(st.booleans()))


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + (varint(len(payload)) + payload if wire == 2 else payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(server_infos())
def test_every_message_protobuf_writes_reads_the_same(data):
    assert by_pbwire(data) == by_protobuf(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([
    field(1, 2, b"host"), field(1, 2, b"\xff"), field(2, 0, varint(-5)), field(2, 0, varint(2**40 + 7)),
    field(3, 2, b"sid"), field(4, 0, b"\x0a"), field(5, 2, field(1, 2, b"q") + field(2, 0, b"\x03")),
    field(5, 2, field(2, 0, b"\x04")), field(5, 2, b""), field(5, 2, field(1, 0, b"\x01")),
    field(5, 2, field(1, 2, b"q") + field(3, 0, b"\x01")), field(5, 2, field(1, 2, b"\xff")),
    field(6, 0, b"\x02"), field(7, 2, b"active"), field(8, 2, field(1, 0, varint(-1)) + field(2, 0, b"\x05")),
    field(8, 2, b""), field(8, 2, field(2, 0, b"\x07")), field(9, 0, b"\x02"), field(9, 5, b"\x01\x02\x03\x04"),
    field(4, 2, b"wrong type"), field(7, 0, b"\x01"), field(10, 1, b"\x00" * 8), field(11, 5, b"\x00" * 4),
    field(12, 3, b"") + field(13, 0, b"\x01") + field(12, 4, b""), field(12, 4, b""), field(12, 3, b""),
    field(12, 3, b"") + field(13, 4, b""), varint(0), varint(7), varint(2**29 << 3), b"\x80" * 11 + b"\x01",
    field(1, 2, b"x")[:-1], b"\x10", b"\x12\x05ab", field(12, 3, b"") + b"\x05abcd" + field(12, 4, b""),
    bytes.fromhex("edda9aec8300") + b"abcd", bytes.fromhex("8a8080800001") + b"x",
]), max_size=8))
def test_edge_cases_of_the_wire_format_read_the_same(parts):
    data = b"".join(parts)
    assert by_pbwire(data) == by_protobuf(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=60))
def test_random_bytes_are_refused_or_read_the_same(data):
    assert by_pbwire(data) == by_protobuf(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(server_infos(), st.integers(0, 200), st.integers(0, 255))
def test_a_corrupted_byte_is_refused_or_read_the_same(data, where, value):
    if data:
        corrupt = bytearray(data)
        corrupt[where % len(data)] = value
        assert by_pbwire(bytes(corrupt)) == by_protobuf(bytes(corrupt))


def test_not_bytes_is_undecodable():
    for value in ("not bytes", None, 7):
        with pytest.raises(asynq.UndecodableError):
            asynq.decode_server_info(value)  # type: ignore[arg-type]


def test_serve_imports_no_protobuf_yaml_bcrypt():
    """The memory a sidecar holds: serve's modules load none of these (--web-config-file loads
    YAML and bcrypt when given)."""
    code = ("import sys, exporter.cli.main, exporter.server.sidecar; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'google', 'yaml', 'bcrypt'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_command_is_imported_without_the_system_cas_and_the_environment_is_restored(monkeypatch):
    """cli imports a command's module (and so aiohttp) with OpenSSL's default CA paths pointed at
    nothing, then puts the environment back as it was, set or not."""
    from exporter.cli import main as cli

    monkeypatch.setenv("SSL_CERT_FILE", "/etc/custom-ca.pem")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with cli._no_system_cas():
        import ssl

        assert ssl.create_default_context().cert_store_stats()["x509_ca"] == 0
    assert os.environ["SSL_CERT_FILE"] == "/etc/custom-ca.pem" and "SSL_CERT_DIR" not in os.environ
    code = ("import ssl, exporter.cli.main as c; c.main(['emulate', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "--heartbeat" in proc.stdout
