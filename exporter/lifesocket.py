"""The lifecycle socket: a Unix stream socket server where each connection is one worker's report.

Each connection is a source: it parses protocol v1 lines and submits the events (stamped with
the time they were received, or the sender's earlier time) to the sidecar's queue. Input is
bounded (line length, messages per connection, connections, a first-message timeout, a time
limit on a line once begun), peers may be restricted to some user ids (SO_PEERCRED); bad input
is counted by reason, logged at a limited rate, and costs only its own connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Protocol

from exporter import protocol
from exporter.config import SocketConfig
from exporter.lifecycle import Disconnected, Event, Hello
from exporter.logs import RateLimiter

log = logging.getLogger("exporter.lifesocket")

#: Lines accepted on one connection; a worker's whole life takes about five.
MAX_MESSAGES = 256


class SocketStats(Protocol):
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def protocol_error(self, reason: str) -> None: ...


class SocketInUseError(OSError):
    """The socket path is served by a live process, or is not a socket at all."""


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """A listening-ready socket bound at `path` with `mode`: parent directories created, a stale
    socket file replaced, a live one (another sidecar) refused."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777)  # nobody may connect before the mode is set
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind the lifecycle socket {path} (--socket): {e.strerror or e}") from None
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; not replacing it (--socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing the stale lifecycle socket %s (nothing serves it)", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError as e:
        raise SocketInUseError(f"cannot tell whether {path} is in use: {e.strerror or e} (--socket)") from None
    finally:
        probe.close()
    raise SocketInUseError(f"another live process (another sidecar?) is serving {path}; stop it or "
                           "choose another --socket")


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer process, as the kernel recorded them when it connected."""
    sock = writer.get_extra_info("socket")
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i")))
    except (AttributeError, OSError):  # SO_PEERCRED is Linux's
        return None


class LifecycleSocket:
    """`async with LifecycleSocket(cfg, submit=..., new_conn_id=..., stats=...)` serves until exit.

    On exit the listening socket and every connection are closed and the socket file removed;
    no Disconnected is submitted then (the sidecar is stopping, the workers are not).
    """

    def __init__(self, cfg: SocketConfig, *, submit: Callable[[Event, float], None],
                 new_conn_id: Callable[[], int], stats: SocketStats,
                 clock: Callable[[], float] = time.time, limiter: RateLimiter | None = None) -> None:
        self.cfg = cfg
        self._submit = submit
        self._new_conn_id = new_conn_id
        self._stats = stats
        self._clock = clock
        self._limiter = limiter or RateLimiter()
        self._open: dict[int, asyncio.Task[None]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._closing = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def __aenter__(self) -> LifecycleSocket:
        if self.cfg.allow_uids and not hasattr(socket, "SO_PEERCRED"):
            raise OSError(f"--socket-allow-uid needs SO_PEERCRED, which {os.uname().sysname} lacks")
        sock = bind_unix_socket(self.cfg.path, self.cfg.mode)
        st = os.stat(self.cfg.path)
        self._inode = (st.st_dev, st.st_ino)
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock,
                                                           limit=self.cfg.max_line)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        allowed = ", uids " + ",".join(map(str, self.cfg.allow_uids)) if self.cfg.allow_uids else ""
        log.info("lifecycle socket listening on %s (mode %04o%s)", self.cfg.path, self.cfg.mode, allowed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        assert self._server is not None
        self._server.close()
        tasks = list(self._open.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._unlink()

    def _unlink(self) -> None:
        """Remove the socket file, unless it is no longer ours (someone replaced it)."""
        try:
            st = os.stat(self.cfg.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.cfg.path)
        except FileNotFoundError:
            pass

    def _reject(self, conn: int | None, peer: int | None, reason: str, detail: str,
                limit_key: str | None = None) -> None:
        self._stats.protocol_error(reason)
        suppressed = self._limiter.allow(limit_key or reason)
        if suppressed is None:
            return
        who = "refused connection" if conn is None else f"connection {conn}"
        peer_text = f" (peer pid {peer})" if peer else ""
        more = f"; {suppressed} similar suppressed" if suppressed else ""
        log.warning("lifecycle %s%s rejected: %s: %s%s", who, peer_text, reason, detail, more,
                    extra={"conn": conn, "peer_pid": peer, "reason": reason})

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        creds = _peer_credentials(writer)
        peer = (creds[0] or None) if creds is not None else None  # pid 0: not known
        if self._closing:
            writer.transport.abort()
            return
        if self.cfg.allow_uids and (creds is None or creds[1] not in self.cfg.allow_uids):
            uid = "unknown" if creds is None else str(creds[1])
            allowed = ",".join(map(str, self.cfg.allow_uids))
            self._reject(None, peer, "peer_not_allowed",
                         f"uid {uid} is not in --socket-allow-uid {allowed}",
                         limit_key=f"peer_not_allowed:{uid}")  # one line per uid and interval
            writer.transport.abort()
            return
        if len(self._open) >= self.cfg.max_connections:
            self._reject(None, peer, "too_many_connections",
                         f"{len(self._open)} connections are open (--max-connections {self.cfg.max_connections})")
            writer.transport.abort()
            return
        conn = self._new_conn_id()
        task = asyncio.current_task()
        assert task is not None
        self._open[conn] = task
        self._stats.connection_opened()
        log.debug("lifecycle connection %d opened (peer pid %s)", conn, peer)
        try:
            await self._serve(conn, peer, reader)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # The sidecar stops with this worker still connected: end quietly (Python 3.11's
            # stream callback would log a cancelled handler as an error with a traceback).
        except (ConnectionError, OSError) as e:
            log.debug("lifecycle connection %d failed: %s", conn, e)
        except Exception:  # a bug here must cost this connection only
            log.exception("lifecycle connection %d: unexpected error", conn)
        finally:
            del self._open[conn]
            self._stats.connection_closed()
            writer.transport.abort()
            if not self._closing:
                self._submit(Disconnected(conn), self._clock())
                log.debug("lifecycle connection %d closed", conn)

    async def _serve(self, conn: int, peer: int | None, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        hello_deadline: float | None = loop.time() + self.cfg.hello_timeout
        previous: float | None = None
        for _ in range(MAX_MESSAGES):
            at_eof = False
            first = b""
            timeout = "hello_timeout"  # which limit a TimeoutError below stands for
            try:
                # Waiting for a line to begin is bounded only until hello: a worker then stays
                # quiet for its whole life. A line once begun must end within line_timeout.
                async with asyncio.timeout_at(hello_deadline):
                    first = await reader.readexactly(1)
                line = first
                if first != b"\n":
                    line_deadline = loop.time() + self.cfg.line_timeout
                    if hello_deadline is None or line_deadline < hello_deadline:
                        timeout = "line_timeout"
                    else:
                        line_deadline = hello_deadline
                    async with asyncio.timeout_at(line_deadline):
                        line = first + await reader.readuntil(b"\n")
            except TimeoutError:
                if timeout == "hello_timeout":
                    self._reject(conn, peer, "hello_timeout",
                                 f"no hello within {self.cfg.hello_timeout:g}s (--hello-timeout); closing")
                else:
                    self._reject(conn, peer, "line_timeout",
                                 f"a line begun but not ended within {self.cfg.line_timeout:g}s; closing")
                return
            except asyncio.IncompleteReadError as e:  # end of stream: a last line without newline?
                line, at_eof = first + e.partial, True
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                self._reject(conn, peer, "oversized",
                             f"a line longer than {self.cfg.max_line} bytes; closing")
                return
            received = self._clock()
            result = protocol.parse(line, conn)
            if isinstance(result, protocol.Invalid):
                self._reject(conn, peer, result.reason, result.detail)
                if result.reason == "oversized":  # one byte over the reader's limit
                    return
            else:
                at = protocol.event_time(result.time, received, previous)
                previous = at
                if isinstance(result.event, Hello):
                    hello_deadline = None
                self._submit(result.event, at)
            if at_eof:
                return
        self._reject(conn, peer, "too_many_messages", f"more than {MAX_MESSAGES} lines; closing")
