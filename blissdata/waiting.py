"""Blocking waits on Redis that last exactly as long as asked, whatever the socket timeout.

redis-py gives every connection a socket timeout (5 s by default): a single XREAD BLOCK
longer than that dies with `redis.TimeoutError`. So a wait is a loop of blocking calls, each
shorter than half the socket timeout (no busy polling: each call blocks in Redis), until data
comes or the caller's timeout passes. A connection lost during the wait (Redis restarted, a
network cut) is retried with exponential backoff; only when Redis stays unreachable for the
store's `reconnect_timeout_s` (or past the wait's own deadline) does the wait end, with
`RedisUnreachableError`. Ctrl-C interrupts at any point (redis-py drops the connection whose
reply it did not read).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import redis
import redis.connection
import tenacity

from .exceptions import RedisUnreachableError

log = logging.getLogger("blissdata")

T = TypeVar("T")
LOST_CONNECTION = (redis.ConnectionError, redis.TimeoutError)


def longest_block_s(client) -> float | None:
    """The longest single blocking call that stays clear of `client`'s socket timeout
    (None: the client has no socket timeout, a call may block forever)."""
    get_kwargs = getattr(client, "get_connection_kwargs", None)
    kwargs = get_kwargs() if get_kwargs is not None else {}
    timeout = kwargs.get("socket_timeout",
                         getattr(redis.connection, "DEFAULT_SOCKET_TIMEOUT", None))
    return None if timeout is None else float(timeout) / 2


class Deadline:
    """When a wait of `timeout` seconds (None: forever) started now must end."""

    def __init__(self, timeout: float | None):
        if timeout is not None and not timeout >= 0:  # also refuses NaN
            raise ValueError(f"timeout must be a number of seconds >= 0 or None (wait for "
                             f"ever), got {timeout!r}")
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def passed(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def block_ms(self, longest_s: float | None) -> int:
        """XREAD's BLOCK argument for the next call: what is left, at most `longest_s`
        (0 means "forever" to Redis: only when both are unbounded)."""
        left = self.left()
        if left is None and longest_s is None:
            return 0
        block = longest_s if left is None else left if longest_s is None else min(left, longest_s)
        return max(1, int(block * 1000))


def call_retrying(store, call: Callable[[], T], deadline: Deadline, what: str) -> T:
    """`call()`; on a lost connection, again with backoff until it works, `deadline` passes
    or Redis stayed unreachable `store.reconnect_timeout_s`: then RedisUnreachableError."""
    try:
        return call()  # the usual case, without the retry machinery
    except LOST_CONNECTION as exc:
        log.warning("Redis at %s unreachable while %s (%s); reconnecting", store.masked_url,
                    what, exc)
    lost_at = time.monotonic()
    give_up_s = store.reconnect_timeout_s

    def stop(state) -> bool:
        return deadline.passed() or (give_up_s is not None
                                     and time.monotonic() - lost_at >= give_up_s)

    def wait(state) -> float:  # never sleep past the caller's deadline
        pause = min(2.0, 0.05 * 2 ** (state.attempt_number - 1))
        left = deadline.left()
        return pause if left is None else max(0.0, min(pause, left))

    def before_sleep(state) -> None:
        log.debug("Redis at %s still unreachable (%s); next try in %.2f s", store.masked_url,
                  state.outcome.exception(), state.next_action.sleep)

    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(LOST_CONNECTION),
                                 stop=stop, wait=wait, before_sleep=before_sleep)
    try:
        got = retrying(call)
    except tenacity.RetryError as exc:
        lost = exc.last_attempt.exception()
        raise RedisUnreachableError(
            f"Redis at {store.masked_url} unreachable while {what} for "
            f"{time.monotonic() - lost_at:.1f} s ({exc.last_attempt.attempt_number} "
            f"attempts to reconnect): {lost}") from lost
    log.warning("Redis at %s: reconnected after %.1f s", store.masked_url,
                time.monotonic() - lost_at)
    return got


def wait_for(store, poll: Callable[[int], T | None], deadline: Deadline,
             what: str) -> T | None:
    """Call ``poll(block_ms)`` (one blocking Redis call of at most `block_ms`; None when
    nothing came) until it returns something, or None once `deadline` passed."""
    longest_s = store.longest_block_s
    while True:
        got = call_retrying(store, lambda: poll(deadline.block_ms(longest_s)), deadline, what)
        if got is not None:
            return got
        if deadline.passed():
            return None
