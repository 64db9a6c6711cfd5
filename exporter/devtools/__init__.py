"""Tools around the sidecar, not part of it: the asynq server emulator (`emulate`), a throw-away
redis-server, and the demo (`demo`).

May import any package; nothing in the sidecar imports devtools/.
"""
