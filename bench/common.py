"""Helpers shared by the benchmarks: realistic data, timing, the table and the JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np


def detector_frames(n: int, shape=(512, 512), dtype=np.uint16, seed=0) -> np.ndarray:
    """Frames like a detector's: Poisson counts on a smooth pattern (not zeros, not noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    base = 20 + 15 * np.sin(x / 37.0) ** 2 + 10 * np.cos(y / 23.0) ** 2
    frames = np.empty((n, *shape), dtype)
    pattern = rng.poisson(base, (8, *shape)).astype(dtype)
    for i in range(n):  # a few distinct frames, cycled, keep generation cheap
        frames[i] = pattern[i % 8]
    return frames


def best_of(repeats: int, func) -> float:
    """Best wall time of `repeats` calls (the least disturbed by a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_json(path: str | Path, name: str, rows: list[dict], params: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "machine": platform.platform(), "params": params,
                                "results": rows}, indent=2))
    print(f"\nresults written to {path}")
