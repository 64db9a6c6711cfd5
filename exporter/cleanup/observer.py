"""The registration observer: a source of events. It follows every live worker of this host, finds
the `asynq:servers` members of its host and pid, judges whose each is (`rule.claim`), tells the
tracker when the worker's registration appears (`RegistrationSeen`: a starting worker becomes
running) and keeps its in-flight task count for when it exits.

Discovery looks every tick until a live registration is known (asynq registers as it starts),
every DISCOVERY_BACKOFF seconds after ten looks; a known registration costs ZSCORE + HLEN a tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.asynq import model as asynq
from exporter.cleanup.rule import Claim, claim
from exporter.cleanup.store import RegistrationStore, decode_member
from exporter.lifecycle.tracker import RegistrationSeen, Worker
from exporter.redisio.health import REDIS_FAILURES, RedisHealth

log = logging.getLogger("exporter.cleanup.observer")

#: Seconds between discovery looks once the quick first looks are over.
DISCOVERY_BACKOFF = 10.0

#: A worker with no registration found this long after its hello is worth a warning.
UNREGISTERED_WARNING = 30.0


@dataclass
class Owned:
    """A `{host:pid:*}` registration found for a worker: whose it is, and its score last seen."""

    member: asynq.Member
    claim: Claim
    score: float | None = None
    doubted: bool = False  # moved after being taken for a dead worker's: only expiry removes it


@dataclass
class Watch:
    """What the observer knows about one worker. Touched only from the one event loop."""

    worker: Worker
    owned: dict[str, Owned] = field(default_factory=dict)  # member key -> Owned
    in_flight: int = 0  # in-flight tasks of its live registrations at the last tick
    reported: set[str] = field(default_factory=set)  # members already sent to the tracker
    next_discovery: float = 0.0
    discoveries: int = 0
    warned_unregistered: bool = False

    def own_reported(self, server_id: str) -> None:
        """The worker told us its server id: checked with O(1) commands from the next tick."""
        m = asynq.server_member(self.worker.host, self.worker.pid, server_id)
        known = self.owned.get(m.key)
        if known is None:
            self.owned[m.key] = Owned(m, Claim.SURE)
        else:
            known.claim = Claim.SURE


class RegistrationObserver:
    """Watches the registrations of the live workers in `watches` (keyed by connection)."""

    def __init__(self, store: RegistrationStore, health: RedisHealth, *, submit: Callable[[Any], None],
                 poll_interval: float, host_pids_unique: bool) -> None:
        self.store = store
        self.health = health
        self._submit = submit
        self.poll_interval = poll_interval
        self.host_pids_unique = host_pids_unique
        self.watches: dict[int, Watch] = {}

    async def observe_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                with self.health.op("observe worker registrations"):
                    now = await self.store.now()
                    for watch in list(self.watches.values()):
                        try:
                            await self.observe(watch, now)
                        except REDIS_FAILURES:
                            raise
                        except Exception:  # a bug or odd data must not end the observation of all
                            log.exception("observing worker pid %d failed", watch.worker.pid)
            except REDIS_FAILURES:
                pass  # counted by health; try again next tick
            await asyncio.sleep(max(0.0, self.poll_interval - (time.monotonic() - started)))

    async def observe(self, watch: Watch, now: float) -> None:
        """One tick for one live worker: discover its registration, or check it with O(1) commands."""
        w = watch.worker
        known_live = any(o.score is not None and o.score >= now for o in watch.owned.values())
        if not known_live and now >= watch.next_discovery:
            # Every tick at first (asynq registers as it starts), then every DISCOVERY_BACKOFF
            # seconds while nothing live is known.
            watch.discoveries += 1
            watch.next_discovery = now + (self.poll_interval if watch.discoveries < 10 else DISCOVERY_BACKOFF)
            await self.discover(watch, since=now)
        if not watch.owned:
            if not watch.warned_unregistered and time.time() - w.hello_at > UNREGISTERED_WARNING:
                watch.warned_unregistered = True
                log.warning("no registration of %s pid %d found %.0fs after its hello: is it an "
                            "asynq server, and is that pid the asynq process (a launcher running a "
                            "shell must `exec` the worker)?", w.host, w.pid, time.time() - w.hello_at)
            return
        owned = [o for o in watch.owned.values() if o.claim.workers]
        results = await self.store.tick([o.member for o in owned])
        in_flight = 0
        for o, (score, count) in zip(owned, results, strict=False):
            o.score = score
            if score is not None and score >= now:
                in_flight += count
                if o.member.key not in watch.reported:
                    watch.reported.add(o.member.key)
                    self._submit(RegistrationSeen(w.conn, o.member.key))
        watch.in_flight = in_flight

    async def discover(self, watch: Watch, since: float) -> None:
        """Find and classify the `{host:pid:*}` members with a score of at least `since`."""
        w = watch.worker
        found = await self.store.find(w.host, w.pid, since)
        # New members, and those whose ServerInfo was not there yet when first seen (asynq's
        # beat adds the members before it writes the ServerInfo) or has expired since.
        new = [m for m in (decode_member(k) for k in found
                           if k not in watch.owned or watch.owned[k].claim is Claim.UNKNOWN) if m is not None]
        if new:
            infos = await self.store.server_infos(new)
            for m, raw in zip(new, infos, strict=False):
                start_time = None
                if raw is not None:
                    try:
                        start_time = asynq.decode_server_info(raw).start_time
                    except asynq.UndecodableError:
                        pass
                found_claim = claim(w, m.ident, start_time, host_pids_unique=self.host_pids_unique)
                known = watch.owned.get(m.key)
                if known is None:
                    watch.owned[m.key] = Owned(m, found_claim, found[m.key])
                elif found_claim is not Claim.UNKNOWN:
                    known.claim = found_claim
        for key, score in found.items():
            if key in watch.owned:
                watch.owned[key].score = score
