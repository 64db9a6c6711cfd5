"""The pure lifecycle state machine: transitions, outcomes, durations, illegal events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.lifecycle.tracker import (
    Bye,
    Disconnected,
    Exited,
    Hello,
    Ready,
    RegistrationSeen,
    Rejected,
    State,
    Stopping,
    Tracker,
    WorkerExited,
    WorkerForgotten,
    WorkerRunning,
    WorkerStarted,
    WorkerStopping,
)


def started(t: Tracker, conn: int = 1, now: float = 100.0) -> None:
    (d,) = t.apply(Hello(conn, pid=7, host="h"), now)
    assert isinstance(d, WorkerStarted)


def test_graceful_life_with_launcher_report():
    t = Tracker(shutdown_budget=25)
    started(t)
    assert t.counts() == {"starting": 1, "running": 0, "stopping": 0}
    assert isinstance(t.apply(Ready(1), 101.0)[0], WorkerRunning)
    assert isinstance(t.apply(Stopping(1, "SIGTERM"), 110.0)[0], WorkerStopping)
    assert t.counts()["stopping"] == 1
    (d,) = t.apply(Exited(1, code=0), 118.25)
    assert isinstance(d, WorkerExited)
    assert (d.outcome, d.reported, d.shutdown_duration, d.over_budget) == ("graceful", True, 8.25, False)
    assert t.counts() == {"starting": 0, "running": 0, "stopping": 0}
    (f,) = t.apply(Disconnected(1), 118.3)
    assert isinstance(f, WorkerForgotten) and t.workers == {}


@pytest.mark.parametrize(
    ("event", "outcome"),
    [(Exited(1, code=0), "graceful"), (Exited(1, code=3), "error"),
     (Exited(1, signal="SIGKILL"), "killed"), (Bye(1), "graceful")],
)
def test_outcomes(event, outcome):
    t = Tracker(25)
    started(t)
    (d,) = t.apply(event, 101)
    assert d.outcome == outcome and d.reported
    assert d.shutdown_duration is None  # no stopping was seen


def test_lost_connection_is_unreported_exit_and_records_duration_after_stopping():
    t = Tracker(shutdown_budget=5)
    started(t)
    t.apply(Stopping(1, "SIGTERM"), 100.0)
    exited, forgotten = t.apply(Disconnected(1), 130.0)
    assert (exited.outcome, exited.reported, exited.shutdown_duration, exited.over_budget) == ("lost", False, 30.0, True)
    assert isinstance(forgotten, WorkerForgotten)


def test_registration_makes_a_starting_worker_running_and_ready_then_confirms():
    t = Tracker(25)
    started(t)
    (d,) = t.apply(RegistrationSeen(1, "asynq:servers:{h:7:x}"), 100.5)
    assert isinstance(d, WorkerRunning) and d.via == "registration"
    assert t.apply(Ready(1), 101) == []
    assert t.workers[1].members == {"asynq:servers:{h:7:x}"}


@pytest.mark.parametrize(
    ("events", "bad"),
    [
        ([Hello(1, 7, "h")], "hello"),
        ([Exited(1, code=0), Exited(1, code=0)], "exited"),
        ([Exited(1, code=0), Ready(1)], "ready"),
        ([Bye(1), Stopping(1)], "stopping"),
    ],
)
def test_illegal_transitions_are_rejected_not_trusted(events, bad):
    t = Tracker(25)
    started(t)
    out = []
    for e in events:
        out = t.apply(e, 101)
    assert out and isinstance(out[-1], Rejected) and out[-1].event == bad


def test_events_before_hello_are_rejected_and_a_bare_disconnect_is_ignored():
    t = Tracker(25)
    (r,) = t.apply(Ready(9), 1)
    assert isinstance(r, Rejected) and r.state == "unknown"
    assert t.apply(Disconnected(9), 1) == []
    assert t.apply(RegistrationSeen(9, "m"), 1) == []


def test_second_stopping_is_ignored_and_keeps_the_first_time():
    t = Tracker(25)
    started(t)
    t.apply(Stopping(1, "SIGTERM"), 100)
    assert t.apply(Stopping(1, "SIGTERM"), 105) == []
    (d,) = t.apply(Exited(1, code=0), 108)
    assert d.shutdown_duration == 8


_events = st.one_of(
    st.builds(Hello, conn=st.integers(0, 3), pid=st.integers(1, 5), host=st.just("h")),
    st.builds(Ready, conn=st.integers(0, 3)),
    st.builds(Stopping, conn=st.integers(0, 3)),
    st.builds(Exited, conn=st.integers(0, 3), code=st.integers(0, 2)),
    st.builds(Bye, conn=st.integers(0, 3)),
    st.builds(Disconnected, conn=st.integers(0, 3)),
    st.builds(RegistrationSeen, conn=st.integers(0, 3), member=st.just("m")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, max_size=40))
def test_any_sequence_keeps_invariants(events):
    """Each connection exits at most once per hello, and counts match the records."""
    t = Tracker(25)
    exits: dict[int, int] = {}
    hellos: dict[int, int] = {}
    for i, e in enumerate(events):
        for d in t.apply(e, float(i)):
            if isinstance(d, WorkerStarted):
                hellos[d.worker.conn] = hellos.get(d.worker.conn, 0) + 1
            if isinstance(d, WorkerExited):
                exits[d.worker.conn] = exits.get(d.worker.conn, 0) + 1
                assert d.shutdown_duration is None or d.shutdown_duration >= 0
    for conn, n in exits.items():
        assert n <= hellos[conn]
    live = sum(1 for w in t.workers.values() if w.state is not State.EXITED)
    assert sum(t.counts().values()) == live
