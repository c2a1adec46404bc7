"""Circuit breaker per federation peer: unit tests on a fake clock (no sleeps) and a state machine."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kas_ray.errors import AccessDenied, KasRayError, KasUnreachableError, error_from_code
from kas_ray.federation.breaker import (
    LEGAL_TRANSITIONS,
    STATE_GAUGE,
    BreakerBoard,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    PeerUnavailable,
    default_is_failure,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """A mutable float the breaker reads as its clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, BreakerState, BreakerState]] = []

    def __call__(self, peer: str, old: BreakerState, new: BreakerState) -> None:
        self.calls.append((peer, old, new))


CFG = BreakerConfig(failure_threshold=3, window_seconds=30, cool_down_seconds=10, success_threshold=2)


def make(config: BreakerConfig = CFG, **kwargs) -> tuple[CircuitBreaker, FakeClock, Recorder]:
    clock, rec = FakeClock(), Recorder()
    return CircuitBreaker("FRA", config, clock=clock, on_transition=rec, **kwargs), clock, rec


def trip(breaker: CircuitBreaker, config: BreakerConfig = CFG) -> None:
    for _ in range(config.failure_threshold):
        breaker.record_failure()
    assert breaker.state is OPEN


async def guarded(breaker: CircuitBreaker, exc: BaseException | None = None) -> str:
    async with breaker.guard():
        if exc is not None:
            raise exc
        return "ok"


# --- config ---------------------------------------------------------------------------------------
def test_config_defaults_frozen_and_validated() -> None:
    cfg = BreakerConfig()
    assert (cfg.failure_threshold, cfg.window_seconds, cfg.cool_down_seconds) == (3, 30.0, 10.0)
    assert (cfg.success_threshold, cfg.half_open_max_calls) == (2, 1)
    with pytest.raises(Exception):
        cfg.failure_threshold = 5  # type: ignore[misc]
    for bad in ({"failure_threshold": 0}, {"window_seconds": 0}, {"success_threshold": 0}, {"unknown": 1}):
        with pytest.raises(Exception):
            BreakerConfig(**bad)


def test_peer_unavailable_error() -> None:
    exc = PeerUnavailable("x", peer="FRA")
    assert isinstance(exc, KasRayError) and exc.code == "peer_unavailable" and exc.http_status == 503
    assert isinstance(error_from_code("peer_unavailable", "m"), PeerUnavailable)


# --- closed -> open -------------------------------------------------------------------------------
def test_opens_after_n_failures_in_window() -> None:
    b, clock, rec = make()
    b.record_failure()
    clock.advance(5)
    b.record_failure()
    assert b.state is CLOSED and b.allow()
    clock.advance(5)
    b.record_failure()
    assert b.state is OPEN
    assert rec.calls == [("FRA", CLOSED, OPEN)]
    assert b.snapshot()["opened_at"] == clock.t


def test_failures_spread_beyond_window_do_not_open() -> None:
    b, clock, _ = make()
    for _ in range(10):
        b.record_failure()
        clock.advance(15.0)  # at most two failures in any 30 s window
    assert b.state is CLOSED
    assert b.snapshot()["failures_in_window"] == 1  # the one 15 s ago; older ones forgotten


def test_window_boundary_is_exclusive() -> None:
    b, clock, _ = make()
    b.record_failure()
    clock.advance(1)
    b.record_failure()
    clock.advance(29)  # the first failure is now exactly window_seconds old: forgotten
    b.record_failure()
    assert b.state is CLOSED
    clock.advance(0.5)
    b.record_failure()
    assert b.state is OPEN


def test_success_in_closed_does_not_reset_window_flapping_peer_opens() -> None:
    b, _, _ = make()
    for _ in range(2):
        b.record_failure()
        b.record_success()
    assert b.state is CLOSED
    b.record_failure()
    assert b.state is OPEN


# --- open -----------------------------------------------------------------------------------------
def test_open_rejects_without_calling() -> None:
    b, clock, _ = make()
    trip(b)
    calls = 0

    async def call() -> None:
        nonlocal calls
        async with b.guard():
            calls += 1

    with pytest.raises(PeerUnavailable) as info:
        asyncio.run(call())
    assert calls == 0
    assert info.value.details["peer"] == "FRA" and info.value.details["retry_after"] == 10.0
    assert not b.allow()
    clock.advance(9.999)
    assert b.state is OPEN and not b.allow()
    assert b.snapshot()["rejected"] == 3


def test_verdicts_while_open_are_ignored() -> None:
    b, clock, rec = make()
    trip(b)
    opened_at = b.snapshot()["opened_at"]
    clock.advance(5)
    b.record_failure()  # a late failure does not extend the cool-down
    b.record_success()  # nor does a late success close the breaker
    assert b.state is OPEN and b.snapshot()["opened_at"] == opened_at
    clock.advance(5)
    assert b.state is HALF_OPEN
    assert [c[1:] for c in rec.calls] == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_dead_peer_costs_one_timeout_then_is_skipped() -> None:
    b, clock, _ = make(BreakerConfig(failure_threshold=1, cool_down_seconds=10))
    attempts = 0

    async def call_dead_peer() -> None:
        nonlocal attempts
        async with b.guard():
            attempts += 1
            await asyncio.wait_for(asyncio.get_running_loop().create_future(), timeout=0)  # never answers

    with pytest.raises(TimeoutError):
        asyncio.run(call_dead_peer())
    for _ in range(5):
        with pytest.raises(PeerUnavailable):
            asyncio.run(call_dead_peer())
    assert attempts == 1 and b.state is OPEN


# --- half-open ------------------------------------------------------------------------------------
def test_cool_down_half_open_then_m_successes_close() -> None:
    b, clock, rec = make()
    trip(b)
    clock.advance(10)
    assert b.state is HALF_OPEN
    assert asyncio.run(guarded(b)) == "ok"
    assert b.state is HALF_OPEN and b.snapshot()["consecutive_successes"] == 1
    assert asyncio.run(guarded(b)) == "ok"
    assert b.state is CLOSED
    assert [c[1:] for c in rec.calls] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    snap = b.snapshot()
    assert snap["failures_in_window"] == 0 and snap["transitions"] == 3
    # closed afresh: it takes N new failures to open again
    b.record_failure()
    b.record_failure()
    assert b.state is CLOSED


def test_half_open_failure_reopens_with_fresh_cool_down() -> None:
    b, clock, rec = make()
    trip(b)
    clock.advance(10)
    assert b.allow()
    b.record_success()
    assert b.allow()
    b.record_failure()  # one failure in half-open re-opens at once
    assert b.state is OPEN
    assert b.snapshot()["opened_at"] == clock.t
    clock.advance(9)
    assert b.state is OPEN and not b.allow()
    clock.advance(1)
    assert b.state is HALF_OPEN
    assert [c[1:] for c in rec.calls] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
    ]


def test_half_open_successes_must_be_consecutive() -> None:
    b, clock, _ = make(BreakerConfig(success_threshold=3, cool_down_seconds=10))
    trip(b)
    clock.advance(10)
    b.record_success()
    b.record_success()
    b.record_failure()
    clock.advance(10)
    assert b.state is HALF_OPEN and b.snapshot()["consecutive_successes"] == 0


def test_half_open_max_calls_rejects_second_concurrent_trial() -> None:
    b, clock, _ = make()
    trip(b)
    clock.advance(10)

    async def scenario() -> None:
        gate = asyncio.Event()
        entered = asyncio.Event()

        async def trial() -> str:
            async with b.guard():
                entered.set()
                await gate.wait()
                return "ok"

        first = asyncio.create_task(trial())
        await entered.wait()
        with pytest.raises(PeerUnavailable):
            await guarded(b)
        assert b.snapshot()["trials_in_flight"] == 1
        gate.set()
        assert await first == "ok"
        assert b.snapshot()["trials_in_flight"] == 0
        assert await guarded(b) == "ok"  # slot free again: second success closes

    asyncio.run(scenario())
    assert b.state is CLOSED


def test_half_open_max_calls_two() -> None:
    b, clock, _ = make(BreakerConfig(half_open_max_calls=2, cool_down_seconds=10))
    trip(b)
    clock.advance(10)
    assert b.allow() and b.allow() and not b.allow()
    b.release()
    assert b.allow() and not b.allow()


def test_cancelled_call_releases_slot_and_counts_neither_way() -> None:
    b, clock, _ = make()
    trip(b)
    clock.advance(10)

    async def scenario() -> None:
        entered = asyncio.Event()

        async def trial() -> None:
            async with b.guard():
                entered.set()
                await asyncio.Event().wait()  # hangs until cancelled (another peer won)

        task = asyncio.create_task(trial())
        await entered.wait()
        assert not b.allow()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    snap = b.snapshot()
    assert b.state is HALF_OPEN
    assert snap["consecutive_successes"] == 0 and snap["trials_in_flight"] == 0
    assert b.allow()  # the slot is free again


def test_cancelled_call_in_closed_is_not_a_failure() -> None:
    b, _, _ = make(BreakerConfig(failure_threshold=1))

    async def scenario() -> None:
        async def call() -> None:
            async with b.guard():
                await asyncio.Event().wait()

        task = asyncio.create_task(call())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert b.state is CLOSED and b.snapshot()["failures_in_window"] == 0


def test_timeout_outside_guard_is_a_cancellation_not_a_failure() -> None:
    """Documents the rule: put the timeout inside the guard, or it is not counted."""
    b, _, _ = make(BreakerConfig(failure_threshold=1))

    async def outside() -> None:
        async with asyncio.timeout(0):
            async with b.guard():
                await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        asyncio.run(outside())
    assert b.state is CLOSED

    async def inside() -> None:
        async with b.guard():
            async with asyncio.timeout(0):
                await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        asyncio.run(inside())
    assert b.state is OPEN


def test_late_verdict_from_earlier_epoch_is_not_a_trial_result() -> None:
    b, clock, _ = make(BreakerConfig(failure_threshold=1, success_threshold=1, cool_down_seconds=10))

    async def scenario() -> None:
        gate = asyncio.Event()

        async def slow_success() -> None:
            async with b.guard():  # admitted while CLOSED
                await gate.wait()

        task = asyncio.create_task(slow_success())
        await asyncio.sleep(0)
        b.record_failure()  # another call fails: OPEN
        clock.advance(10)
        assert b.state is HALF_OPEN
        gate.set()
        await task  # its success is from before the opening: not a trial, breaker stays half-open

    asyncio.run(scenario())
    assert b.state is HALF_OPEN


# --- classification -------------------------------------------------------------------------------
def test_4xx_exceptions_are_not_failures() -> None:
    b, _, _ = make(BreakerConfig(failure_threshold=1))
    for exc in (AccessDenied("no"), KasRayError("bad request")):
        with pytest.raises(type(exc)):
            asyncio.run(guarded(b, exc))
    assert b.state is CLOSED and b.snapshot()["failures_in_window"] == 0
    assert b.snapshot()["consecutive_successes"] == 2  # the peer answered


@pytest.mark.parametrize("exc", [KasUnreachableError("down"), ConnectionError("reset"), TimeoutError(), ValueError()])
def test_transport_errors_timeouts_and_5xx_are_failures(exc: Exception) -> None:
    b, _, _ = make(BreakerConfig(failure_threshold=1))
    with pytest.raises(type(exc)):
        asyncio.run(guarded(b, exc))
    assert b.state is OPEN


def test_default_is_failure() -> None:
    class Http(Exception):
        def __init__(self, status: int) -> None:
            self.http_status = status

    assert [default_is_failure(Http(s)) for s in (399, 400, 403, 404, 499, 500, 502, 503)] == [
        True,
        False,
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert not default_is_failure(KeyboardInterrupt())


def test_custom_is_failure() -> None:
    b, _, _ = make(BreakerConfig(failure_threshold=1), is_failure=lambda exc: not isinstance(exc, LookupError))
    with pytest.raises(KeyError):
        asyncio.run(guarded(b, KeyError("k")))
    assert b.state is CLOSED
    with pytest.raises(RuntimeError):
        asyncio.run(guarded(b, RuntimeError()))
    assert b.state is OPEN


def test_raising_classifier_counts_a_failure() -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("classifier bug")

    b, _, _ = make(BreakerConfig(failure_threshold=1), is_failure=broken)
    with pytest.raises(ValueError):
        asyncio.run(guarded(b, ValueError()))
    assert b.state is OPEN


# --- callbacks and status -------------------------------------------------------------------------
def test_on_transition_sequence_and_raising_callback() -> None:
    clock = FakeClock()
    seen: list[tuple[str, BreakerState, BreakerState]] = []

    def boom(peer: str, old: BreakerState, new: BreakerState) -> None:
        seen.append((peer, old, new))
        raise RuntimeError("audit sink down")

    b = CircuitBreaker("GBR", CFG, clock=clock, on_transition=boom)
    trip(b)
    clock.advance(10)
    assert b.state is HALF_OPEN
    b.record_failure()
    clock.advance(10)
    b.record_success()
    b.record_success()
    assert b.state is CLOSED
    assert seen == [
        ("GBR", CLOSED, OPEN),
        ("GBR", OPEN, HALF_OPEN),
        ("GBR", HALF_OPEN, OPEN),
        ("GBR", OPEN, HALF_OPEN),
        ("GBR", HALF_OPEN, CLOSED),
    ]
    assert all((old, new) in LEGAL_TRANSITIONS for _, old, new in seen)


def test_snapshot_is_json_serialisable() -> None:
    b, clock, _ = make()
    snap = b.snapshot()
    assert set(snap) >= {
        "peer",
        "state",
        "failures_in_window",
        "consecutive_successes",
        "opened_at",
        "last_failure",
        "transitions",
    }
    assert snap["state"] == "closed" and snap["opened_at"] is None and snap["last_failure"] is None
    trip(b)
    clock.advance(3)
    snap = json.loads(json.dumps(b.snapshot()))
    assert snap["state"] == "open" and snap["retry_after_seconds"] == 7.0
    assert snap["recent_transitions"] == [{"from": "closed", "to": "open", "at": clock.t - 3}]
    assert STATE_GAUGE[BreakerState(snap["state"])] == 2


def test_board() -> None:
    clock, rec = FakeClock(), Recorder()
    board = BreakerBoard(CFG, ["FRA", "GBR"], clock=clock, on_transition=rec)
    assert list(board) == ["FRA", "GBR"] and "FRA" in board and len(board) == 2
    assert board.get("FRA") is board.get("FRA")
    with pytest.raises(KeyError):
        board.get("XXX")
    trip(board.get("GBR"))
    snap = json.loads(json.dumps(board.snapshot()))
    assert {p: s["state"] for p, s in snap.items()} == {"FRA": "closed", "GBR": "open"}
    assert rec.calls == [("GBR", CLOSED, OPEN)]


# --- state machine --------------------------------------------------------------------------------
class BreakerMachine(RuleBasedStateMachine):
    """Random success/failure/slot/cancel/clock sequences; invariants on states, edges and admissions.

    ``slots`` models the half-open trial slots taken with ``allow()`` (by the epoch they were taken
    in); a slot of an earlier epoch is void. It must always equal the breaker's own count.
    """

    @initialize(
        n=st.integers(1, 4),
        window=st.sampled_from([1.0, 5.0, 30.0]),
        cool=st.sampled_from([0.0, 1.0, 10.0]),
        m=st.integers(1, 3),
        max_calls=st.integers(1, 2),
    )
    def setup(self, n: int, window: float, cool: float, m: int, max_calls: int) -> None:
        self.cfg = BreakerConfig(
            failure_threshold=n,
            window_seconds=window,
            cool_down_seconds=cool,
            success_threshold=m,
            half_open_max_calls=max_calls,
        )
        self.clock = FakeClock()
        self.transitions: list[tuple[BreakerState, BreakerState, float]] = []
        self.raise_in_callback = False

        def on_transition(peer: str, old: BreakerState, new: BreakerState) -> None:
            assert peer == "USA"
            self.transitions.append((old, new, self.clock()))
            if self.raise_in_callback:
                raise RuntimeError("callback failure must not break the breaker")

        self.breaker = CircuitBreaker("USA", self.cfg, clock=self.clock, on_transition=on_transition)
        self.slots: list[int] = []
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            self.loop.close()

    def held(self) -> int:
        self.slots = [epoch for epoch in self.slots if epoch == self.breaker._epoch]
        return len(self.slots)

    def new_targets(self, before: int) -> set[BreakerState]:
        return {new for _, new, _ in self.transitions[before:]}

    def bare_verdict(self, record, allowed_targets: set[BreakerState]) -> None:
        self.breaker.state  # the lazy cool-down edge, if due, happens here
        epoch, before = self.breaker._epoch, len(self.transitions)
        record()
        assert self.new_targets(before) <= allowed_targets
        if self.breaker._epoch == epoch and self.held():
            self.slots.pop()  # a bare verdict settles one trial slot of the current epoch

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 5.0, 10.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        before = len(self.transitions)
        self.breaker.state
        assert all(t[:2] == (OPEN, HALF_OPEN) for t in self.transitions[before:])  # reading: cool-down edge only

    @rule()
    def failure(self) -> None:
        self.bare_verdict(self.breaker.record_failure, {OPEN})  # a failure never closes or half-opens

    @rule()
    def success(self) -> None:
        self.bare_verdict(self.breaker.record_success, {CLOSED})  # a success never opens

    @rule()
    def take_slot(self) -> None:
        state, held = self.breaker.state, self.held()
        allowed = self.breaker.allow()
        if state is OPEN:
            assert not allowed
        elif state is CLOSED:
            assert allowed
        else:
            assert allowed == (held < self.cfg.half_open_max_calls)
            if allowed:
                self.slots.append(self.breaker._epoch)

    @precondition(lambda self: self.held() > 0)
    @rule()
    def release(self) -> None:
        before = self.breaker.snapshot()
        self.breaker.release()
        self.slots.pop()
        after = self.breaker.snapshot()
        for key in ("state", "consecutive_successes", "failures_in_window", "transitions"):
            assert after[key] == before[key], key

    @rule(outcome=st.sampled_from(["ok", "5xx", "403", "cancel"]))
    def guarded_call(self, outcome: str) -> None:
        state, held = self.breaker.state, self.held()
        before, n_before = self.breaker.snapshot(), len(self.transitions)

        async def body() -> None:
            async with self.breaker.guard():
                if outcome == "5xx":
                    raise KasUnreachableError("down")
                if outcome == "403":
                    raise AccessDenied("no")
                if outcome == "cancel":
                    raise asyncio.CancelledError

        try:
            self.loop.run_until_complete(body())
        except PeerUnavailable:
            assert state is OPEN or (state is HALF_OPEN and held >= self.cfg.half_open_max_calls)
            after = self.breaker.snapshot()
            assert after["rejected"] == before["rejected"] + 1 and after["state"] == before["state"]
            return
        except (KasUnreachableError, AccessDenied, asyncio.CancelledError):
            pass
        targets = self.new_targets(n_before)  # before snapshot(): with no cool-down it half-opens at once
        assert state is not OPEN
        after = self.breaker.snapshot()
        if outcome == "cancel":
            assert not targets
            for key in ("state", "consecutive_successes", "failures_in_window"):
                assert after[key] == before[key], key
        elif outcome == "5xx":
            assert targets <= {OPEN}
        else:
            assert targets <= {CLOSED}

    @rule(flag=st.booleans())
    def toggle_callback_failure(self, flag: bool) -> None:
        self.raise_in_callback = flag

    @invariant()
    def state_is_one_of_three(self) -> None:
        assert self.breaker._state in (CLOSED, OPEN, HALF_OPEN)
        assert self.breaker.state in (CLOSED, OPEN, HALF_OPEN)

    @invariant()
    def open_never_allows(self) -> None:
        if self.breaker.state is OPEN:
            assert not self.breaker.allow()
            with pytest.raises(PeerUnavailable):
                self.loop.run_until_complete(guarded(self.breaker))

    @invariant()
    def transitions_are_legal_chained_and_timed(self) -> None:
        previous, opened_at = CLOSED, None
        for old, new, at in self.transitions:
            assert (old, new) in LEGAL_TRANSITIONS
            assert old == previous
            if new is OPEN:
                opened_at = at
            if (old, new) == (OPEN, HALF_OPEN):
                assert opened_at is not None and at - opened_at >= self.cfg.cool_down_seconds
            previous = new
        assert previous == self.breaker._state

    @invariant()
    def counters_agree_and_are_bounded(self) -> None:
        b = self.breaker
        assert b._trials_in_flight == self.held() <= self.cfg.half_open_max_calls
        if b._state is not HALF_OPEN:
            assert b._trials_in_flight == 0
        if b._state is CLOSED:
            assert b._failures_in_window(self.clock()) < self.cfg.failure_threshold
        else:
            assert not b._failures
        if b._state is HALF_OPEN:
            assert b._consecutive_successes < self.cfg.success_threshold
        json.dumps(b.snapshot())


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
