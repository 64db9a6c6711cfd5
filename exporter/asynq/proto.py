"""Asynq's protobuf messages, built at import from descriptors that mirror `asynq.proto`.

Building the descriptors in code keeps the package free of generated `_pb2` files (whose
gencode/runtime version pairing breaks across protobuf majors). tests/asynq/test_model.py
compiles `asynq.proto` with protoc and checks that it yields exactly these descriptors.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT32, _BOOL, _BYTES, _MESSAGE = (
    _F.TYPE_STRING,
    _F.TYPE_INT32,
    _F.TYPE_BOOL,
    _F.TYPE_BYTES,
    _F.TYPE_MESSAGE,
)
_TIMESTAMP = ".google.protobuf.Timestamp"

# (name, number, type, type_name or None, repeated)
_MESSAGES: dict[str, list[tuple[str, int, int, str | None, bool]]] = {
    "ServerInfo": [
        ("host", 1, _STRING, None, False),
        ("pid", 2, _INT32, None, False),
        ("server_id", 3, _STRING, None, False),
        ("concurrency", 4, _INT32, None, False),
        ("queues", 5, _MESSAGE, ".asynq.ServerInfo.QueuesEntry", True),
        ("strict_priority", 6, _BOOL, None, False),
        ("status", 7, _STRING, None, False),
        ("start_time", 8, _MESSAGE, _TIMESTAMP, False),
        ("active_worker_count", 9, _INT32, None, False),
    ],
    "WorkerInfo": [
        ("host", 1, _STRING, None, False),
        ("pid", 2, _INT32, None, False),
        ("server_id", 3, _STRING, None, False),
        ("task_id", 4, _STRING, None, False),
        ("task_type", 5, _STRING, None, False),
        ("task_payload", 6, _BYTES, None, False),
        ("queue", 7, _STRING, None, False),
        ("start_time", 8, _MESSAGE, _TIMESTAMP, False),
        ("deadline", 9, _MESSAGE, _TIMESTAMP, False),
    ],
    "SchedulerEntry": [
        ("id", 1, _STRING, None, False),
        ("spec", 2, _STRING, None, False),
        ("task_type", 3, _STRING, None, False),
        ("task_payload", 4, _BYTES, None, False),
        ("enqueue_options", 5, _STRING, None, True),
        ("next_enqueue_time", 6, _MESSAGE, _TIMESTAMP, False),
        ("prev_enqueue_time", 7, _MESSAGE, _TIMESTAMP, False),
    ],
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of `asynq.proto`, as protoc would produce it (without source info)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="asynq.proto",
        package="asynq",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    for msg_name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        for name, number, ftype, type_name, repeated in fields:
            field = msg.field.add(
                name=name,
                number=number,
                type=ftype,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
                json_name=_camel(name),
            )
            if type_name:
                field.type_name = type_name
        if msg_name == "ServerInfo":
            entry = msg.nested_type.add(name="QueuesEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_STRING, label=_F.LABEL_OPTIONAL, json_name="key")
            entry.field.add(name="value", number=2, type=_INT32, label=_F.LABEL_OPTIONAL, json_name="value")
    return fdp


_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
_pool.Add(file_descriptor_proto())

ServerInfo = message_factory.GetMessageClass(_pool.FindMessageTypeByName("asynq.ServerInfo"))
WorkerInfo = message_factory.GetMessageClass(_pool.FindMessageTypeByName("asynq.WorkerInfo"))
SchedulerEntry = message_factory.GetMessageClass(_pool.FindMessageTypeByName("asynq.SchedulerEntry"))
