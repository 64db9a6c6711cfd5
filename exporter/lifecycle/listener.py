"""The lifecycle socket: a Unix stream socket server where each connection is one worker's report.

Each connection is a source: it parses protocol v1 lines and submits the events (stamped with
the time they were received, or the sender's earlier time) to the sidecar's queue. Input is
bounded (line length, messages per connection, connections, a first-message timeout, a time
limit on a line once begun), peers may be restricted to some user ids (SO_PEERCRED); bad input
is counted by reason, logged at a limited rate, and costs only its own connection. A burst of
connections waits for a slot rather than being refused, quiet connections that never prove to
be asynq workers give way to newcomers, and a deleted socket file is recreated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from exporter.lifecycle import protocol
from exporter.lifecycle.tracker import Disconnected, Event, Hello
from exporter.logs import RateLimiter
from exporter.settings import SocketConfig

log = logging.getLogger("exporter.lifecycle.listener")

#: Lines accepted on one connection; a worker's whole life takes about five.
MAX_MESSAGES = 256

#: Seconds between two checks that the socket file is still this server's (one stat each).
CHECK_INTERVAL = 1.0

#: Connections the kernel queues for accept() beyond those the server holds.
LISTEN_BACKLOG = 100

#: Seconds between two looks for a connection to evict, while connections wait for a slot
#: and every open one is proven (a proven worker's exit can make it evictable).
EVICT_RECHECK = 1.0


class SocketStats(Protocol):
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def protocol_error(self, reason: str) -> None: ...
    def socket_recreated(self) -> None: ...


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
    # A non-blocking probe: it must not stall the event loop when the watcher calls it, and a
    # listener whose backlog is full (EAGAIN) is alive all the same.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("replacing the stale lifecycle socket %s (nothing serves it)", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except BlockingIOError:
        pass  # a live listener with a full backlog
    except OSError as e:
        raise SocketInUseError(f"cannot tell whether {path} is in use: {e.strerror or e} (--socket)") from None
    finally:
        probe.close()
    raise SocketInUseError(f"another live process (another sidecar?) is serving {path}; stop it or "
                           "choose another --socket")


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer process, as the kernel recorded them when it connected."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   struct.calcsize("3i")))
    except (AttributeError, OSError):  # SO_PEERCRED is Linux's
        return None


@dataclass(slots=True, eq=False)
class _Connection:
    """A connection that holds one of the --max-connections slots."""

    id: int
    peer: int | None
    opened_at: float  # loop time when it got its slot
    transport: asyncio.WriteTransport | None = None
    said_hello: bool = False
    said_more: bool = False  # a valid event after hello
    evicted: bool = False

    @property
    def quiet(self) -> bool:
        """Said hello and nothing since: what an idle or stuck connection looks like."""
        return self.said_hello and not self.said_more


class LifecycleSocket:
    """`async with LifecycleSocket(cfg, submit=..., new_conn_id=..., stats=..., proven=...)` serves
    until exit.

    Connections are admitted into at most `cfg.max_connections` slots. One that arrives when all
    are taken waits, unread, for a slot (for at most `cfg.hello_timeout`; at most as many wait as
    there are slots, and beyond that the kernel's listen backlog holds the rest). While some
    wait, the oldest connection that said hello at least `cfg.hello_timeout` ago and is not
    `proven(conn)` (the sidecar's proof that it is an asynq worker) is evicted to make room;
    proven connections never are.

    The socket file is checked every CHECK_INTERVAL seconds: if it was deleted or replaced, a
    new one is bound (connections already open go on), unless the path now holds something
    that is not a stale socket of ours to replace; `listening` is False meanwhile.

    On exit the listening socket and every connection are closed and the socket file removed;
    no Disconnected is submitted then (the sidecar is stopping, the workers are not).
    """

    def __init__(self, cfg: SocketConfig, *, submit: Callable[[Event, float], None],
                 new_conn_id: Callable[[], int], stats: SocketStats,
                 proven: Callable[[int], bool] = lambda conn: False,
                 clock: Callable[[], float] = time.time, limiter: RateLimiter | None = None) -> None:
        self.cfg = cfg
        self._submit = submit
        self._new_conn_id = new_conn_id
        self._stats = stats
        self._proven = proven
        self._clock = clock
        self._limiter = limiter or RateLimiter()
        self._open: dict[int, _Connection] = {}
        self._queue: deque[object] = deque()  # connections waiting for a slot, first come first
        self._handlers: set[asyncio.Task[None]] = set()  # one per accepted connection
        self._changed = asyncio.Event()  # replaced on every notice: see _notify
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._retired: list[tuple[socket.socket, asyncio.Task[None]]] = []  # replaced listeners
        self._watching: asyncio.Task[None] | None = None
        self._inode: tuple[int, int] | None = None
        self._not_listening_since: float | None = None  # loop time, while the watcher cannot bind
        self._closing = False

    @property
    def open_connections(self) -> int:
        """Connections holding a slot (the asynq_sidecar_socket_connections gauge)."""
        return len(self._open)

    @property
    def waiting_connections(self) -> int:
        """Accepted connections waiting, unread, for a slot."""
        return len(self._queue)

    @property
    def listening(self) -> bool:
        """Whether a worker can connect now: the file at the path is the socket this server
        listens on (one stat; /readyz reads it)."""
        if self._listener is None:
            return False
        try:
            st = os.stat(self.cfg.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def __aenter__(self) -> LifecycleSocket:
        if self.cfg.allow_uids and not hasattr(socket, "SO_PEERCRED"):
            raise OSError(f"--socket-allow-uid needs SO_PEERCRED, which {os.uname().sysname} lacks")
        sock = bind_unix_socket(self.cfg.path, self.cfg.mode)
        try:
            self._listen(sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._watching = asyncio.create_task(self._watch(), name="lifecycle-socket-watch")
        allowed = ", uids " + ",".join(map(str, self.cfg.allow_uids)) if self.cfg.allow_uids else ""
        log.info("lifecycle socket listening on %s (mode %04o%s)", self.cfg.path, self.cfg.mode, allowed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        tasks = [t for t in (self._watching, self._accepting) if t is not None] + list(self._handlers)
        tasks += [t for _, t in self._retired]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in [self._listener, *(sock for sock, _ in self._retired)]:
            if listener is not None:
                listener.close()
        self._unlink()

    def _listen(self, sock: socket.socket) -> None:
        """Serve `sock` (bound at the path) from now on, in place of any earlier listener, which
        `_close_retired` closes."""
        sock.setblocking(False)
        sock.listen(LISTEN_BACKLOG)
        st = os.stat(self.cfg.path)
        if self._listener is not None and self._accepting is not None:
            self._accepting.cancel()  # it only awaits the next accept: nothing is lost
            self._retired.append((self._listener, self._accepting))
        self._listener, self._inode = sock, (st.st_dev, st.st_ino)
        self._accepting = asyncio.create_task(self._accept_forever(sock), name="lifecycle-socket-accept")

    async def _close_retired(self) -> None:
        """Close the listeners that were replaced (unreachable since their file went; accepted
        connections are sockets of their own). Each only once its accept task has ended: that
        takes its descriptor out of the event loop's selector, which must never see a closed
        descriptor whose number the kernel may already have given to a new socket."""
        while self._retired:
            listener, task = self._retired[0]
            await asyncio.wait([task])
            listener.close()
            self._retired.pop(0)

    def _unlink(self) -> None:
        """Remove the socket file, unless it is no longer ours (someone replaced it)."""
        try:
            st = os.stat(self.cfg.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.cfg.path)
        except FileNotFoundError:
            pass

    def _notify(self) -> None:
        """Wake everything waiting for a change of slots (waiting connections, the accept loop)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, until: float) -> None:
        changed = self._changed
        try:
            async with asyncio.timeout_at(until):
                await changed.wait()
        except TimeoutError:
            pass

    # ------------------------------------------------------------ the socket file

    async def _watch(self) -> None:
        """Every CHECK_INTERVAL, make sure the socket file is still ours; bind a new one if not."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            if self.listening:
                continue
            try:
                sock = bind_unix_socket(self.cfg.path, self.cfg.mode)
            except OSError as e:  # something else holds the path: leave it alone, try again later
                if self._not_listening_since is None:
                    self._not_listening_since = loop.time()
                    log.warning("lifecycle socket %s is not listening: %s; workers cannot connect "
                                "and /readyz fails until it can listen there again (retrying every %gs)",
                                self.cfg.path, e, CHECK_INTERVAL, extra={"socket": self.cfg.path})
                continue
            try:
                self._listen(sock)
            except OSError as e:
                sock.close()
                log.warning("lifecycle socket %s: cannot listen on a new socket: %s", self.cfg.path, e)
                continue
            await self._close_retired()
            self._stats.socket_recreated()
            since = self._not_listening_since
            self._not_listening_since = None
            after = f" after {loop.time() - since:.0f}s" if since is not None else ""
            log.warning("lifecycle socket %s recreated%s: its file was deleted or replaced "
                        "(connections open before go on)", self.cfg.path, after,
                        extra={"socket": self.cfg.path})

    # ------------------------------------------------------------ admission

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # At most as many connections wait for a slot as there are slots; the rest stay in
            # the kernel's listen backlog (where a blocking connect() waits) until there is room.
            while len(self._handlers) >= 2 * self.cfg.max_connections:
                await self._wait_for_change(loop.time() + 3600)
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and the like: the sidecar is short of something
                if (n := self._limiter.allow("accept")) is not None:
                    log.warning("lifecycle socket %s: accept failed: %s%s", self.cfg.path, e,
                                f"; {n} similar suppressed" if n else "")
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._notify()

    async def _take_slot(self, peer: int | None) -> bool:
        """Wait (first come, first served) for a free slot; False if none came within
        --hello-timeout. Waiting connections make room by evicting unproven ones."""
        if not self._queue and len(self._open) < self.cfg.max_connections:
            return True
        loop = asyncio.get_running_loop()
        me = object()
        self._queue.append(me)
        deadline = loop.time() + self.cfg.hello_timeout
        try:
            while True:
                if self._queue[0] is me and len(self._open) < self.cfg.max_connections:
                    return True
                now = loop.time()
                if now >= deadline:
                    self._reject(None, peer, "too_many_connections",
                                 f"no slot freed within {self.cfg.hello_timeout:g}s (--hello-timeout): "
                                 f"{len(self._open)} connections are open (--max-connections "
                                 f"{self.cfg.max_connections}) and none could be evicted")
                    return False
                next_candidate = self._evict(now)
                await self._wait_for_change(min(deadline, next_candidate or now + EVICT_RECHECK))
        finally:
            self._queue.remove(me)
            self._notify()  # the next in line may take a slot now

    def _evict(self, now: float) -> float | None:
        """Evict the oldest quiet, unproven connections open for --hello-timeout, as many as the
        waiting ones need beyond the slots already free or being freed. Returns when the next
        quiet one becomes old enough, if any is still too young."""
        free = self.cfg.max_connections - len(self._open)
        freeing = sum(c.evicted for c in self._open.values())
        need = len(self._queue) - free - freeing
        if need <= 0:
            return None
        candidates = sorted((c for c in self._open.values() if c.quiet and not c.evicted),
                            key=lambda c: c.opened_at)
        for c in candidates:
            if now - c.opened_at < self.cfg.hello_timeout:
                return c.opened_at + self.cfg.hello_timeout  # the rest are younger still
            if self._proven(c.id):
                continue
            c.evicted = True
            self._reject(c.id, c.peer, "evicted",
                         f"open {now - c.opened_at:.1f}s, quiet since its hello, without proof of an asynq "
                         f"worker (no registration seen, no server id) while {len(self._queue)} connection(s) "
                         f"wait for a slot (--max-connections {self.cfg.max_connections}); closing the "
                         "oldest such")
            assert c.transport is not None  # set before its first line was read
            c.transport.abort()
            need -= 1
            if need == 0:
                break
        return None

    # ------------------------------------------------------------ one connection

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

    async def _handle(self, sock: socket.socket) -> None:
        transport: asyncio.WriteTransport | None = None  # owns `sock` once made
        try:
            creds = _peer_credentials(sock)
            peer = (creds[0] or None) if creds is not None else None  # pid 0: not known
            if self.cfg.allow_uids and (creds is None or creds[1] not in self.cfg.allow_uids):
                uid = "unknown" if creds is None else str(creds[1])
                allowed = ",".join(map(str, self.cfg.allow_uids))
                self._reject(None, peer, "peer_not_allowed",
                             f"uid {uid} is not in --socket-allow-uid {allowed}",
                             limit_key=f"peer_not_allowed:{uid}")  # one line per uid and interval
                return
            if not await self._take_slot(peer):
                return
            # No await between the slot and this record: nobody else can take the slot.
            conn = _Connection(self._new_conn_id(), peer, asyncio.get_running_loop().time())
            self._open[conn.id] = conn
            self._stats.connection_opened()
            log.debug("lifecycle connection %d opened (peer pid %s)", conn.id, peer)
            try:
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=protocol.MAX_LINE)
                conn.transport = transport = writer.transport
                await self._serve(conn, reader)
            except asyncio.CancelledError:
                if not self._closing:
                    raise
            except (ConnectionError, OSError) as e:
                log.debug("lifecycle connection %d failed: %s", conn.id, e)
            except Exception:  # a bug here must cost this connection only
                log.exception("lifecycle connection %d: unexpected error", conn.id)
            finally:
                del self._open[conn.id]
                self._stats.connection_closed()
                if transport is not None:
                    transport.abort()  # closes the socket
                if not self._closing:
                    self._submit(Disconnected(conn.id), self._clock())
                    log.debug("lifecycle connection %d closed", conn.id)
        finally:
            if transport is None:
                sock.close()

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        peer = conn.peer
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
                    self._reject(conn.id, peer, "hello_timeout",
                                 f"no hello within {self.cfg.hello_timeout:g}s (--hello-timeout); closing")
                else:
                    self._reject(conn.id, peer, "line_timeout",
                                 f"a line begun but not ended within {self.cfg.line_timeout:g}s; closing")
                return
            except asyncio.IncompleteReadError as e:  # end of stream: a last line without newline?
                line, at_eof = first + e.partial, True
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                self._reject(conn.id, peer, "oversized",
                             f"a line longer than {protocol.MAX_LINE} bytes; closing")
                return
            received = self._clock()
            result = protocol.parse(line, conn.id)
            if isinstance(result, protocol.Invalid):
                self._reject(conn.id, peer, result.reason, result.detail)
                if result.reason == "oversized":  # one byte over the reader's limit
                    return
            else:
                at = protocol.event_time(result.time, received, previous)
                previous = at
                if isinstance(result.event, Hello):
                    hello_deadline = None
                    conn.said_more = conn.said_hello
                    conn.said_hello = True
                else:
                    conn.said_more = conn.said_hello
                self._submit(result.event, at)
            if at_eof:
                return
        self._reject(conn.id, peer, "too_many_messages", f"more than {MAX_MESSAGES} lines; closing")
