"""Replay stores: remember one-time values (DPoP ``jti``, nonces) for a bounded time.

A store is shared by every caller that must refuse a second use of the same value, so keys are
namespaced by the caller (``"dpop:<jkt>:<jti>"``). The in-memory store protects one process only;
a replica set needs the shared (Redis) store so a proof replayed to another replica is refused too.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

_log = logging.getLogger(__name__)


class ReplayStore(ABC):
    """Atomic "first use" check for one-time values."""

    @abstractmethod
    def check_and_store(self, key: str, ttl_seconds: float) -> bool:
        """Record ``key`` for ``ttl_seconds``; True when it was not already recorded (first use)."""

    async def acheck_and_store(self, key: str, ttl_seconds: float) -> bool:
        """Async twin of :meth:`check_and_store`; stores with network I/O override it."""
        return self.check_and_store(key, ttl_seconds)


class MemoryReplayStore(ReplayStore):
    """Thread-safe in-process store with expiring entries and a hard size bound.

    When full, expired entries go first; if it is still full the entry closest to expiry is
    evicted (its replay window shrinks) rather than refusing new values, which would let a flood
    of proofs deny service to everyone. ``clock`` is monotonic so wall-clock jumps do not
    resurrect or expire entries.
    """

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (expiry, key); consistent with _expiry after _purge
        self._evictions = 0

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._expiry)

    @property
    def evictions(self) -> int:
        """Unexpired entries dropped because the store was full (a sizing signal for operators)."""
        return self._evictions

    def check_and_store(self, key: str, ttl_seconds: float) -> bool:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        with self._lock:
            now = self._clock()
            self._purge(now)
            if key in self._expiry:
                return False
            expiry = now + ttl_seconds
            self._expiry[key] = expiry
            heapq.heappush(self._heap, (expiry, key))
            while len(self._expiry) > self._max:
                _, evicted = heapq.heappop(self._heap)
                del self._expiry[evicted]
                self._evictions += 1
                if self._evictions == 1 or self._evictions % 10_000 == 0:
                    _log.warning("replay store full (%d entries): evicting unexpired entries", self._max)
            return True

    def _purge(self, now: float) -> None:
        # Every key is in the heap exactly once, so popping expired heads keeps both in step.
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]
