"""Producers stopped by Ctrl-C or SIGTERM end their scan (`blissdata-simulate`,
`blissdata-replay`): closed with USER_ABORT, so the writer finishes its file at once instead
of keeping it open until the scan is deleted from Redis.

`stop_on_signals()` turns SIGINT and SIGTERM into :class:`Interrupted` (a KeyboardInterrupt)
once; further signals are ignored while the scan is being ended. The publishing code calls
:func:`end_interrupted` on the scans it had open and lets the exception go on.
"""

from __future__ import annotations

import contextlib
import signal

from .exceptions import BlissdataError
from .scan import EndReason, ScanState


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while publishing; ``ended`` names the scans closed because of it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_status = 128 + signal.Signals[signal_name].value
        self.ended: list[str] = []

    def message(self, program: str) -> str:
        """The one line a command prints when it stops so."""
        ended = "; ".join(self.ended) or "no scan was open"
        return f"{program}: stopped by {self.signal_name}: ended with USER_ABORT: {ended}"


def _raise(signum, _frame):
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the ending
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    saved = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def end_interrupted(scan, why: BaseException) -> None:
    """Close `scan` with USER_ABORT after the points it holds (a send cut short may have
    reached Redis or not: each stream is sealed after what Redis has)."""
    if scan.state == ScanState.CLOSED:
        return
    reason = getattr(why, "signal_name", type(why).__name__)
    try:
        scan.end_abandoned(EndReason.USER_ABORT, f"producer interrupted ({reason})")
    except BlissdataError:  # closed meanwhile, or deleted: nothing left to end
        return
    if isinstance(why, Interrupted):
        why.ended.append(f"scan {scan.number} {scan.name} ({scan.key})")
