"""asynq's data in Redis, as asynq writes it: key and member names, the registration constants, and
the protobuf messages (ServerInfo, WorkerInfo, SchedulerEntry) with a dependency-free ServerInfo
decoder (pbwire).

Pure: no I/O. Imports only the standard library (and protobuf, on first full decode).
"""
