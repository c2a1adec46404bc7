"""One replica's connection to Redis: pooled client, timeouts, a short "down" window, secrets.

:class:`RedisLink` is what the cache, the replay store and the rate limiter share in one replica.
Every operation has a deadline; a failure marks Redis down for ``retry_interval_seconds`` so the
requests meanwhile do not each wait for a timeout, then the next operation tries again (the pool
reconnects by itself). What "down" means is each caller's decision: a miss for the cache, 503 or a
local fallback for the replay store, the local window for the rate limiter.

Secrets (the Redis password, the cache sealing secret) are read here, in the nation's own processes,
from an environment variable or a file; the settings only name them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kas_ray.config import Profile, RedisConfig
from kas_ray.errors import ConfigError

logger = logging.getLogger("kas_ray.redis")

T = TypeVar("T")
#: Minimum length of a sealing secret given by the operator (bytes).
MIN_SEAL_SECRET_BYTES = 32


class RedisUnavailable(Exception):  # noqa: N818 - a condition, not a programming error
    """Redis did not answer (down, too slow, refused the command): each caller decides what that means."""


class ThrottledLog:
    """Log a recurring warning at most once per ``interval`` seconds, counting what it held back."""

    def __init__(self, log: logging.Logger, interval: float = 30.0, *, clock: Callable[[], float] = time.monotonic):
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last = -float("inf")
        self.suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} similar warnings suppressed)"
        self._log.warning(message, *args)
        self._last, self.suppressed = now, 0


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        value = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"the {what} file {path} is empty")
    return value


def load_password(config: RedisConfig) -> str | None:
    """The Redis password from the environment variable or file the settings name (None: no AUTH)."""
    if config.password_env:
        value = os.environ.get(config.password_env)
        if not value:
            raise ConfigError(f"redis.password_env names {config.password_env}, which is not set")
        return value
    if config.password_file:
        return _read_secret_file(config.password_file, "redis password").decode()
    return None


def seal_secret_path(state_dir: str | os.PathLike[str], nation: str) -> Path:
    return Path(state_dir) / "secrets" / f"cache-seal-{nation.lower()}.key"


def load_seal_secret(config: RedisConfig, nation: str, state_dir: str | os.PathLike[str], profile: Profile) -> bytes:
    """The secret a nation's cache sealing keys are derived from.

    From ``seal_secret_env`` or ``seal_secret_file``; otherwise (dev profile only) 32 random bytes
    generated once into ``<state_dir>/secrets/cache-seal-<nation>.key`` with mode 0600. Every replica
    of a nation must see the same secret, or they cannot open each other's entries (they become misses).
    """
    if config.seal_secret_env:
        value = os.environ.get(config.seal_secret_env, "").encode()
        if not value:
            raise ConfigError(f"redis.seal_secret_env names {config.seal_secret_env}, which is not set")
    elif config.seal_secret_file:
        value = _read_secret_file(config.seal_secret_file, "cache sealing secret")
    elif profile != "dev":
        raise ConfigError("the prod profile needs redis.seal_secret_env or redis.seal_secret_file")
    else:
        path = seal_secret_path(state_dir, nation)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_hex(32).encode())
        value = path.read_bytes().strip()
    if len(value) < MIN_SEAL_SECRET_BYTES:
        raise ConfigError(f"the cache sealing secret must be at least {MIN_SEAL_SECRET_BYTES} bytes")
    return value


def make_client(config: RedisConfig, password: str | None) -> Redis:
    """A pooled asyncio client: connect and command timeouts, no silent retries (the caller decides)."""
    kwargs: dict[str, Any] = {
        "max_connections": config.max_connections,
        "timeout": config.command_timeout_seconds,  # wait for a free pooled connection
        "socket_connect_timeout": config.connect_timeout_seconds,
        "socket_timeout": config.command_timeout_seconds,
        # A retried SET NX whose first reply was lost would report a replay: never retry behind our back.
        "retry": Retry(NoBackoff(), 0),
        "username": config.username,
        "password": password,
        "client_name": "kas-ray",
        # RESP2: under RESP3, redis-py 8 turns on maintenance notifications, and with them the pool stops
        # checking a pooled connection before handing it out; after a Redis restart every connection of
        # the pool would then fail one command (and mark Redis down) before it is replaced.
        "protocol": 2,
    }
    if config.url.lower().startswith("rediss://"):
        kwargs.update(ssl_cert_reqs="required", ssl_ca_certs=config.tls_ca_file,
                      ssl_certfile=config.tls_cert_file, ssl_keyfile=config.tls_key_file)
    pool = BlockingConnectionPool.from_url(config.url, **kwargs)
    return Redis.from_pool(pool)  # the client owns (and closes) its pool


class RedisLink:
    """The Redis client of one replica (one per event loop), with deadlines and a down window."""

    def __init__(self, config: RedisConfig, nation: str, *, password: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.nation = nation.upper()
        #: Every key of this nation starts with this (grant the nation's ACL user ``~{prefix}*``).
        self.prefix = f"{config.key_prefix}{self.nation}:"
        self._password = password if password is not None else load_password(config)
        self._clock = clock
        # redis.asyncio connections belong to the loop that opened them.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()
        self._down_until = -float("inf")
        self.available = True
        self.counters: Counter[str] = Counter()
        self._warn = ThrottledLog(logger)
        self.deadline = config.connect_timeout_seconds + config.command_timeout_seconds

    def client(self) -> Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = make_client(self.config, self._password)
        return client

    @property
    def retry_after(self) -> float:
        """Seconds until Redis is tried again (at least the configured interval, for Retry-After)."""
        return max(self._down_until - self._clock(), self.config.retry_interval_seconds)

    def is_down(self) -> bool:
        return self._clock() < self._down_until

    async def run(self, what: str, op: Callable[[Redis], Awaitable[T]]) -> T:
        """``op(client)`` under the deadline; RedisUnavailable when Redis is down, slow or refuses."""
        if self.is_down():
            self.counters["skipped"] += 1
            raise RedisUnavailable(f"redis is marked down ({what})")
        try:
            async with asyncio.timeout(self.deadline):
                result = await op(self.client())
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:  # down, AUTH, too slow
            self._down_until = self._clock() + self.config.retry_interval_seconds
            self.counters["failures"] += 1
            self.available = False
            self._warn.warning("kas-ray %s: redis %s failed (%s: %s); going on without it, retrying in %.1fs",
                               self.nation, what, type(exc).__name__, str(exc)[:200],
                               self.config.retry_interval_seconds)
            raise RedisUnavailable(f"redis {what} failed") from None
        except RedisError as exc:  # it answered but refused this command (ACL, wrong type): not "down"
            self.counters["refused"] += 1
            self._warn.warning("kas-ray %s: redis refused %s (%s: %s); going on without it",
                               self.nation, what, type(exc).__name__, str(exc)[:200])
            raise RedisUnavailable(f"redis refused {what}") from None
        if not self.available:
            self.available = True
            self.counters["recoveries"] += 1
            logger.warning("kas-ray %s: redis is reachable again", self.nation)
        return result

    def status(self) -> dict[str, Any]:
        return {"available": self.available and not self.is_down(), **self.counters}

    async def aclose(self) -> None:
        """Close the client of the running loop (tests; replicas keep theirs until they exit)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
