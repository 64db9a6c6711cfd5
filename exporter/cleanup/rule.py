"""The one rule for removing an asynq registration: which registrations are a dead worker's, and when
one may go. Pure (no I/O, no clock): the cleanup asks `claim()` and `verdict()`, and sends the
resulting mode to the removal script below, which rechecks it atomically in Redis.

A registration is removed **at once** only when two things are proven:

- it is the worker's: it carries a server id the worker reported (`hello` or `registered`), or
  the deployment promises that on this host name one process at a time holds a pid
  (`--host-pids unique`) and the registration started within the worker's life;
- the worker is done with it: its launcher reported the exit after `waitpid` (`exited`), or
  the worker said it deregistered (`bye`): anything of it left in Redis after that is a leak.

Anything else (a lost connection, a registration that could be a twin's in another PID
namespace, an earlier life's, one whose ServerInfo is gone) is removed only **once asynq itself
calls it dead**: Redis's `TIME` is past its expiry score by more than `--settle`. A live server
rewrites its score to now + 10 s every 5 s, so that can never remove a live registration
(unless the server stalls or its clock is off by more than 5 s plus the margin, when asynq's own
listing drops it too).

Every removal is conditional in Redis: the script removes the member only if its score has not
advanced past the score seen when deciding (a heartbeat since means a live owner) and, in the
`expired` mode, only if Redis's own clock says it is expired.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from exporter.lifecycle.tracker import Worker

#: A registration started within a worker's life when its ServerInfo.start_time is no earlier
#: than the worker's start less this many seconds. The worker, its launcher and the sidecar of a
#: pod read one kernel clock, and asynq stamps start_time after the process started; a large
#: allowance would let a crash loop's next life claim the registration of the life before it.
OWNERSHIP_SKEW = 0.5


class Claim(enum.Enum):
    """Whose a `{host:pid:*}` registration is, as far as a worker's own report shows."""

    SURE = "sure"            # carries a server id the worker reported
    UNIQUE = "unique"        # started within the worker's life, and host:pid is unique here
    PROBABLE = "probable"    # started within the worker's life; a twin's is possible
    EARLIER = "earlier"      # started before the worker: an earlier life of this host and pid
    LATER = "later"          # started after the worker exited: a newer life (a restarted container)
    UNKNOWN = "unknown"      # no ServerInfo to judge by (its 10 s TTL ran out, or undecodable)

    @property
    def workers(self) -> bool:
        """Taken for the worker's own (its exit leaked it, if it is left behind)."""
        return self in (Claim.SURE, Claim.UNIQUE, Claim.PROBABLE)


class Verdict(enum.Enum):
    NOW = "now"              # proven the dead worker's: remove if no heartbeat came since seen
    WHEN_EXPIRED = "expired"  # remove once Redis's clock is past its expiry by more than settle
    LEAVE = "leave"          # not this worker's business


def claim(worker: Worker, ident: str, start_time: float | None, *, host_pids_unique: bool) -> Claim:
    """Whose the registration `{worker.host:worker.pid:ident}` is, given its ServerInfo.start_time."""
    if ident in worker.server_ids:
        return Claim.SURE
    if start_time is None:
        return Claim.UNKNOWN
    if start_time < worker.born_at - OWNERSHIP_SKEW:
        return Claim.EARLIER
    if worker.exited_at is not None and start_time > worker.exited_at:
        return Claim.LATER
    return Claim.UNIQUE if host_pids_unique else Claim.PROBABLE


def verdict(found: Claim, *, done: bool) -> Verdict:
    """What may happen to a registration with claim `found`; `done` when the worker's exit was
    reported by its launcher (`exited`) or the worker deregistered itself (`bye`)."""
    if found is Claim.LATER:
        return Verdict.LEAVE  # a newer life's: live, or the sweep's once long expired
    if done and found in (Claim.SURE, Claim.UNIQUE):
        return Verdict.NOW
    return Verdict.WHEN_EXPIRED


# KEYS[1] = a sorted set; ARGV[1] = member; ARGV[2] = the score seen when deciding; ARGV[3] =
# "now" or "expired"; ARGV[4] = with "expired", the seconds past its expiry (by Redis's TIME)
# that the score must be. Returns 1 removed, 0 kept (a heartbeat since, or not expired), -1 absent.
REMOVE_IF_UNCHANGED = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s then return -1 end
s = tonumber(s)
if s > tonumber(ARGV[2]) then return 0 end
if ARGV[3] == 'expired' then
  local t = redis.call('TIME')
  if s + tonumber(ARGV[4]) >= tonumber(t[1]) + tonumber(t[2]) / 1000000 then return 0 end
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

REMOVED, KEPT, ABSENT = 1, 0, -1


def judged(found: Claim, *, doubted: bool, done: bool) -> Verdict:
    """`verdict()`, except that a registration that moved after it was taken for a dead
    worker's (`doubted`: a live server may own it) goes only once expired."""
    return Verdict.WHEN_EXPIRED if doubted else verdict(found, done=done)


@dataclass(frozen=True)
class Step:
    """What to do now with one registration a departed worker left, given its score."""

    remove: Verdict | None  # run the removal script in this mode; None: nothing now
    wake: float | None = None  # not yet expired: seconds until it would be (and is worth a look)


def step(how: Verdict, score: float | None, now: float, settle: float) -> Step:
    """The next step for a registration judged `how`, whose score (expiry) is `score` (None:
    gone) at Redis time `now`. A WHEN_EXPIRED registration waits until `now` is past its
    expiry by more than `settle`; the removal script checks that again in Redis."""
    if how is Verdict.LEAVE or score is None:
        return Step(None)
    if how is Verdict.WHEN_EXPIRED and score + settle >= now:
        return Step(None, wake=score + settle - now + 0.05)
    return Step(how)
