"""Progress lines of the command-line tools: redrawn in place on a terminal; in a file or a
pipe, one line at the end (no carriage returns in logs)."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressLine:
    """``progress(done, total)`` callback printing ``"<label>: done/total <unit>"``; call
    ``close()`` once the work is over."""

    def __init__(self, label: str, unit: str = "points", out: TextIO | None = None):
        self.label, self.unit = label, unit
        self.out = out or sys.stdout
        self.on_terminal = self.out.isatty()
        self.last: str | None = None

    def __call__(self, done: int, total: int) -> None:
        self.last = f"{self.label}: {done}/{total} {self.unit}"
        if self.on_terminal:
            print(f"\r{self.last}", end="", file=self.out, flush=True)

    def close(self) -> None:
        if self.last is None:
            return
        print("" if self.on_terminal else self.last, file=self.out, flush=True)
        self.last = None
