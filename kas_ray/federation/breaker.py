"""Circuit breaker per federation peer: a dead peer costs one timeout at most once, then is skipped.

The home KAS forwards key access objects to peer nations' KAS in parallel. Each peer has one
:class:`CircuitBreaker`; a :class:`BreakerBoard` holds those of one KAS.

States and edges (the only legal ones)::

    CLOSED --N counted failures within window_seconds--> OPEN
    OPEN --cool_down_seconds elapsed (evaluated lazily)--> HALF_OPEN
    HALF_OPEN --one counted failure--> OPEN (fresh cool-down)
    HALF_OPEN --M consecutive trial successes--> CLOSED

Semantics chosen here:

* **Counted failures** are transport errors, timeouts and 5xx. Under :meth:`CircuitBreaker.guard`
  an exception is classified by ``is_failure``; the default counts every ``Exception`` except
  those whose ``http_status`` is 4xx (a 403 is a policy answer from a live peer). An exception that
  is *not* a failure counts as a success: the peer answered.
* **Sliding window.** CLOSED keeps the timestamps of the last ``failure_threshold`` failures in a
  bounded deque; a failure at ``t`` counts while ``now - t < window_seconds``. A success in CLOSED
  does **not** reset the window, so a flapping peer (fail, ok, fail, ok, fail) still opens.
* **Half-open trials.** :meth:`CircuitBreaker.allow` in HALF_OPEN takes one of
  ``half_open_max_calls`` trial slots; every ``True`` from ``allow()`` must be settled by exactly
  one of :meth:`~CircuitBreaker.record_success`, :meth:`~CircuitBreaker.record_failure` or
  :meth:`~CircuitBreaker.release` (no verdict: the call was cancelled, e.g. another peer won).
  :meth:`~CircuitBreaker.guard` does this bookkeeping and is the recommended API.
* **Late verdicts.** ``guard`` remembers the breaker epoch (bumped on every transition) at which
  it was admitted. A verdict of a call admitted before the current OPEN/HALF_OPEN epoch does not
  count as a trial result: it is ignored in OPEN and HALF_OPEN, while a late *failure* landing in
  CLOSED still counts (it is real evidence). The bare ``record_*`` methods have no admission
  record and are taken as verdicts of the current epoch.
* **Timeouts must be inside the guard.** ``asyncio.CancelledError`` means "no verdict", and
  ``asyncio.timeout``/``wait_for`` *outside* the guard cancels the body, so it is not counted::

      async with breaker.guard():            # right: TimeoutError is raised inside -> failure
          async with asyncio.timeout(t):
              await call_peer()

* ``on_transition(peer, old, new)`` is called synchronously after every transition (audit events,
  metrics), under the breaker's lock: keep it cheap (hand off to a queue). An exception from it is
  logged and swallowed; so is one from ``is_failure`` (the call then counts as a failure).
* Thread-safe via a re-entrant lock (replicas normally drive it from one event loop; the lock is
  cheap and keeps sync handlers in a thread pool correct too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kas_ray.config import BreakerConfig
from kas_ray.errors import KasRayError

_log = logging.getLogger(__name__)

Clock = Callable[[], float]
TransitionCallback = Callable[[str, "BreakerState", "BreakerState"], None]
FailureClassifier = Callable[[BaseException], bool]

#: How many recent transitions a breaker keeps for its status snapshot.
HISTORY_LENGTH = 16


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: Gauge value per state for metrics (0 healthy, 2 skipped).
STATE_GAUGE: dict[BreakerState, int] = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

#: The only transitions a breaker makes.
LEGAL_TRANSITIONS: frozenset[tuple[BreakerState, BreakerState]] = frozenset(
    {
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    }
)


class PeerUnavailable(KasRayError):
    """The peer KAS is skipped: its circuit breaker is open; retry later."""

    code = "peer_unavailable"
    http_status = 503


def default_is_failure(exc: BaseException) -> bool:
    """Every ``Exception`` is a counted failure except those carrying a 4xx ``http_status``."""
    if not isinstance(exc, Exception):
        return False
    status = getattr(exc, "http_status", None)
    return not (isinstance(status, int) and 400 <= status <= 499)


@dataclass(frozen=True, slots=True)
class _Ticket:
    """Admission record of one guarded call: the epoch it was admitted in, and whether it is a trial."""

    epoch: int
    trial: bool


class CircuitBreaker:
    """The breaker of one peer. See the module docstring for the semantics."""

    def __init__(
        self,
        peer: str,
        config: BreakerConfig,
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
        is_failure: FailureClassifier = default_is_failure,
    ) -> None:
        self.peer = peer
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self._is_failure = is_failure
        self._lock = threading.RLock()
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._failures: deque[float] = deque(maxlen=config.failure_threshold)
        self._consecutive_successes = 0
        self._trials_in_flight = 0
        self._opened_at: float | None = None
        self._last_failure: float | None = None
        self._transitions = 0
        self._rejected = 0
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)

    # --- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """Current state; an OPEN breaker whose cool-down has elapsed becomes HALF_OPEN here."""
        with self._lock:
            return self._current(self._clock())

    def _current(self, now: float) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._opened_at is not None
            and now - self._opened_at >= self.config.cool_down_seconds
        ):
            self._transition(BreakerState.HALF_OPEN, now)
        return self._state

    def _transition(self, new: BreakerState, now: float) -> None:
        old = self._state
        if (old, new) not in LEGAL_TRANSITIONS:  # pragma: no cover - internal invariant
            raise AssertionError(f"illegal breaker transition {old} -> {new}")
        self._state = new
        self._epoch += 1
        self._consecutive_successes = 0
        self._trials_in_flight = 0
        if new is BreakerState.OPEN:
            self._opened_at = now
            self._failures.clear()
        elif new is BreakerState.CLOSED:
            self._failures.clear()
        self._transitions += 1
        self._history.append({"from": old.value, "to": new.value, "at": now})
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        _log.log(level, "federation peer %s breaker %s -> %s", self.peer, old.value, new.value)
        if self._on_transition is not None:
            try:
                self._on_transition(self.peer, old, new)
            except Exception:
                _log.exception("breaker on_transition callback failed for peer %s (%s -> %s)", self.peer, old, new)

    def _failures_in_window(self, now: float) -> int:
        horizon = now - self.config.window_seconds
        while self._failures and self._failures[0] <= horizon:
            self._failures.popleft()
        return len(self._failures)

    # --- admission --------------------------------------------------------------------------------
    def _acquire(self) -> _Ticket:
        with self._lock:
            now = self._clock()
            state = self._current(now)
            if state is BreakerState.CLOSED:
                return _Ticket(self._epoch, trial=False)
            if state is BreakerState.HALF_OPEN and self._trials_in_flight < self.config.half_open_max_calls:
                self._trials_in_flight += 1
                return _Ticket(self._epoch, trial=True)
            self._rejected += 1
            retry_after = self._retry_after(now)
        raise PeerUnavailable(
            f"peer {self.peer} is skipped: circuit breaker {state.value}", peer=self.peer, retry_after=retry_after
        )

    def _retry_after(self, now: float) -> float:
        if self._state is BreakerState.OPEN and self._opened_at is not None:
            return max(0.0, self._opened_at + self.config.cool_down_seconds - now)
        return 0.0

    def allow(self) -> bool:
        """May a call go to the peer now? In HALF_OPEN a ``True`` takes a trial slot (settle it)."""
        try:
            self._acquire()
        except PeerUnavailable:
            return False
        return True

    # --- verdicts ---------------------------------------------------------------------------------
    def _settle(self, ticket: _Ticket | None, verdict: bool | None) -> None:
        """``verdict`` True: success, False: counted failure, None: no verdict (slot released).

        ``ticket`` None: a bare verdict, taken as one of the current epoch (after the lazy cool-down).
        """
        with self._lock:
            now = self._clock()
            state = self._current(now)
            if ticket is None:
                ticket = _Ticket(self._epoch, trial=True)
            current = ticket.epoch == self._epoch
            if state is BreakerState.HALF_OPEN and current and ticket.trial:
                self._trials_in_flight = max(0, self._trials_in_flight - 1)
            if verdict is None:
                return
            if state is BreakerState.CLOSED:
                if verdict:
                    self._consecutive_successes += 1
                    return
                self._consecutive_successes = 0
                self._last_failure = now
                self._failures.append(now)
                if self._failures_in_window(now) >= self.config.failure_threshold:
                    self._transition(BreakerState.OPEN, now)
            elif state is BreakerState.HALF_OPEN and current:
                if verdict:
                    self._consecutive_successes += 1
                    if self._consecutive_successes >= self.config.success_threshold:
                        self._transition(BreakerState.CLOSED, now)
                else:
                    self._last_failure = now
                    self._transition(BreakerState.OPEN, now)
            # OPEN, or a late verdict from an earlier epoch while HALF_OPEN: not evidence, ignored.

    def record_success(self) -> None:
        """The peer answered (a verdict of the current epoch)."""
        self._settle(None, True)

    def record_failure(self) -> None:
        """A counted failure: transport error, timeout or 5xx (a verdict of the current epoch)."""
        self._settle(None, False)

    def release(self) -> None:
        """A half-open trial slot ends without a verdict (e.g. cancelled because another peer won)."""
        self._settle(None, None)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run one call to the peer under the breaker.

        Raises :class:`PeerUnavailable` before the body runs when the peer is skipped. On normal
        exit records a success; on an exception records a failure if ``is_failure(exc)`` else a
        success, and re-raises; ``asyncio.CancelledError`` (and other ``BaseException``) releases
        the slot without a verdict. Put the call's timeout *inside* the guard.
        """
        ticket = self._acquire()
        try:
            yield
        except asyncio.CancelledError:
            self._settle(ticket, None)
            raise
        except Exception as exc:
            self._settle(ticket, not self._classify(exc))
            raise
        except BaseException:
            self._settle(ticket, None)
            raise
        else:
            self._settle(ticket, True)

    def _classify(self, exc: BaseException) -> bool:
        try:
            return bool(self._is_failure(exc))
        except Exception:
            _log.exception("breaker is_failure classifier failed for peer %s; counting a failure", self.peer)
            return True

    # --- status -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-safe status. Times are readings of the breaker's clock (monotonic seconds by default)."""
        with self._lock:
            now = self._clock()
            state = self._current(now)
            return {
                "peer": self.peer,
                "state": state.value,
                "failures_in_window": self._failures_in_window(now),
                "consecutive_successes": self._consecutive_successes,
                "opened_at": self._opened_at,
                "last_failure": self._last_failure,
                "transitions": self._transitions,
                "retry_after_seconds": self._retry_after(now),
                "trials_in_flight": self._trials_in_flight,
                "rejected": self._rejected,
                "recent_transitions": list(self._history),
            }


class BreakerBoard:
    """The breakers of all peers of one KAS, one per configured peer."""

    def __init__(
        self,
        config: BreakerConfig,
        peers: Iterable[str],
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
        is_failure: FailureClassifier = default_is_failure,
    ) -> None:
        self.config = config
        self._breakers = {
            peer: CircuitBreaker(peer, config, clock=clock, on_transition=on_transition, is_failure=is_failure)
            for peer in peers
        }

    def get(self, peer: str) -> CircuitBreaker:
        """The breaker of a configured peer; ``KeyError`` for any other name (the board never grows)."""
        return self._breakers[peer]

    def __contains__(self, peer: object) -> bool:
        return peer in self._breakers

    def __iter__(self) -> Iterator[str]:
        return iter(self._breakers)

    def __len__(self) -> int:
        return len(self._breakers)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {peer: breaker.snapshot() for peer, breaker in self._breakers.items()}
