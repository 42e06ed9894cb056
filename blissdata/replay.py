"""`blissdata-replay FILE --entry 3.1`: publish an archived scan back into Redis as a new scan
(header, mapping, every stream; optionally at its original pace), so online processing and
the writer can run on it again.

Before publishing it checks that the new scan's file does not hold its entry already (the
writer would refuse it: exit 2). Ctrl-C or SIGTERM ends the new scan (USER_ABORT) before
exiting (status 130 or 143). Without --session the scan goes to the original's session,
said on stderr: a writer writes it only if it follows that session."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import lost_points
from .archive import ArchiveError, ArchivedScan, open_scan
from .exceptions import IndexNoMoreThereError
from .file_backing import open_h5
from .interrupt import Interrupted, end_interrupted, stop_on_signals
from .progress import ProgressLine
from .scan import EndReason
from .store import DataStore, url_from

BATCH_BYTES = 2 * 2**20  # about one Redis entry per stream per batch


def _references(stream, folder: Path, new_folder: Path) -> list[dict]:
    """The {"file", "dataset", "index"} points behind a virtual dataset. A relative source
    (as detectors write them: beside the scan file) stays relative, to the new scan file's
    folder `new_folder`; an absolute one stays absolute."""
    refs = []
    for vs in stream.dataset.virtual_sources():
        (lo, *_), (hi, *_) = vs.vspace.get_select_bounds()
        (src_lo, *_), _ = vs.src_space.get_select_bounds()
        file = vs.file_name
        if file == ".":  # frames of the archived file itself
            file = str(Path(stream.dataset.file.filename).resolve())
        elif not os.path.isabs(file):
            file = os.path.relpath(os.path.normpath(folder / file), new_folder)
        refs.extend({"file": file, "dataset": vs.dset_name, "index": int(src_lo + k)}
                    for k in range(hi - lo + 1))
    return refs


def _timeline(archived: ArchivedScan, n: int) -> np.ndarray:
    """Seconds from the start of each point: an elapsed_time stream, else count_time."""
    for name, stream in archived.streams.items():
        if name.endswith("elapsed_time") and len(stream) >= n and not stream.shape:
            return np.asarray(stream[:n], dtype=float)
    return np.arange(n) * float(archived.info.get("count_time", 0) or 0)


def replay(store: DataStore, archived: ArchivedScan, session: str | None = None,
           path: str | None = None, number: int | None = None, speed: float | None = None,
           progress=None):
    """Publish `archived` as a new scan; returns it. `speed`: 1 = original pace, 2 = twice
    as fast, None = as fast as possible. A scan whose writer recorded points lost in Redis
    (fill values in the file) is refused: IndexNoMoreThereError naming them."""
    lost = {n: s.lost for n, s in archived.streams.items() if getattr(s, "lost", None)}
    if lost:
        raise IndexNoMoreThereError(
            f"{archived.path}::{archived.entry_name}: {lost_points.count(lost)} points were "
            f"lost in Redis before the writer stored them ({lost_points.describe(lost)}); "
            f"the file holds fill values there: not replayed")
    identity = dict(archived.identity)
    if session:
        identity["session"] = session
    if number is not None:
        identity["number"] = number
    original = Path(archived.path)
    identity["path"] = path or str(original.with_name(f"{original.stem}_replay{original.suffix}"))
    info = copy.deepcopy(archived.info)
    for field in ("start_time", "end_time", "end_reason"):
        info.pop(field, None)
    info["scan_nb"] = identity["number"]
    info.setdefault("type", "replay")
    info.setdefault("title", archived.entry_name)
    info["replayed_from"] = f"{archived.path}::{archived.entry_name}"
    scan = store.create_scan(identity, info=info)
    try:
        _publish(scan, archived, identity, speed, progress)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (blissdata.interrupt)
        end_interrupted(scan, exc)
        raise
    return scan


def existing_entry(path: str, number: int, info: dict) -> str | None:
    """Where the file `path` already holds the entry a scan numbered `number` would get
    (the writer never overwrites one), or None. It looks at the entry's name in the file
    itself (a scan's group, or a shared file's link to its own file) and at the file
    the per_scan layout would give it (docs/files.md)."""
    entry = info.get("entry_name") or f"{number}.1"
    target = Path(path)
    per_scan = target.with_name(f"{target.stem}_{number:04d}{target.suffix or '.h5'}")
    for candidate in (target, per_scan):
        if not candidate.is_file():
            continue
        try:  # also a file a writer has open, or this process (the archived scan's)
            with open_h5(str(candidate)) as f:
                if f.get(entry, getlink=True) is not None:  # a group, or a link to one
                    return f"{candidate}::/{entry}"
        except OSError:  # not HDF5, or unreadable: the writer will say why
            continue
    return None


def _publish(scan, archived: ArchivedScan, identity: dict, speed: float | None, progress):
    streams, refs = {}, {}
    for name, src in archived.streams.items():
        d = src.definition
        if d.encoding == "references":
            if not src.dataset.is_virtual:
                archived.not_replayable[name] = "references stored without a virtual dataset"
                continue
            # relative sources start at the folder of the file holding the virtual dataset
            # (a scan's own file: docs/files.md)
            refs[name] = _references(src, Path(src.dataset.file.filename).resolve().parent,
                                     Path(identity["path"]).resolve().parent)
        # frames stored one per Bitshuffle+LZ4 chunk travel as those chunks (no decompression
        # here, no compression in the writer); readers get the same arrays
        encoding = "bslz4" if src.stored_as_frames else d.encoding
        streams[name] = scan.create_stream(name, dtype=d.dtype, shape=d.shape,
                                           encoding=encoding, info=d.info)
    scan.prepare()
    scan.start()
    total = max((len(s) for s in archived.streams.values()), default=0)
    point_bytes = max((s.dataset.dtype.itemsize * int(np.prod(s.dataset.shape[1:]))
                       for s in archived.streams.values()), default=8)
    # at full speed, batches of ~2 MiB; at the original pace, each point at its own time
    step = 1 if speed else max(1, min(1000, BATCH_BYTES // max(point_bytes, 1)))
    timeline = _timeline(archived, total) if speed else None
    t0 = time.monotonic()
    for start in range(0, total, step):
        stop = min(start + step, total)
        if speed:
            delay = t0 + timeline[start] / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        batch = {}
        for name, out in streams.items():
            src = archived.streams[name]
            a, b = min(start, len(src)), min(stop, len(src))
            if a >= b:
                continue
            if name in refs:
                batch[out] = refs[name][a:b]
            elif out.encoding == "bslz4" and src.stored_as_frames:
                batch[out] = src.chunks(a, b)  # stored chunks, untouched
            else:
                batch[out] = src[a:b]
        scan.send_many(batch)
        if progress:
            progress(stop, total)
    scan.stop()
    scan.close(EndReason(archived.info.get("end_reason", "SUCCESS")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blissdata-replay", description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--entry", help="entry name, e.g. 3.1 (default: the file's default)")
    parser.add_argument("--session", help="session of the new scan (default: the original)")
    parser.add_argument("--number", type=int, help="scan number (default: the original)")
    parser.add_argument("--path", help="file of the new scan (default: FILE_replay.h5)")
    parser.add_argument("--speed", type=float, help="1 = original pace (default: full speed)")
    parser.add_argument("--redis", help="Redis URL (default: REDIS_URL, then localhost)")
    args = parser.parse_args(argv)
    try:
        archived = open_scan(args.file, args.entry)
    except ArchiveError as exc:
        print(f"blissdata-replay: {exc}", file=sys.stderr)
        return 2
    url = url_from(args.redis)
    try:
        store = DataStore(url)
    except (ConnectionError, ValueError) as exc:
        print(f"blissdata-replay: {exc}", file=sys.stderr)
        return 1
    with archived:
        session = args.session or archived.identity["session"]
        if not args.session:
            print(f"blissdata-replay: no --session: the scan goes to session {session!r}, "
                  f"the original's (a writer writes it only if it follows {session!r})",
                  file=sys.stderr)
        number = archived.identity["number"] if args.number is None else args.number
        original = Path(archived.path)
        path = args.path or str(original.with_name(f"{original.stem}_replay"
                                                   f"{original.suffix}"))
        there = existing_entry(path, number, archived.info)
        if there:
            print(f"blissdata-replay: {there} already exists and the writer never overwrites "
                  f"an entry: give another --path or --number", file=sys.stderr)
            return 2
        progress = ProgressLine("replaying")
        try:
            with stop_on_signals():
                scan = replay(store, archived, args.session, path, args.number, args.speed,
                              progress=progress)
        except Interrupted as exc:
            progress.close()
            print(exc.message("blissdata-replay"), file=sys.stderr)
            return exc.exit_status
        except IndexNoMoreThereError as exc:  # points lost: nothing published
            progress.close()
            print(f"blissdata-replay: {exc}", file=sys.stderr)
            return 2
        progress.close()
        print(f"replayed {archived.path}::{archived.entry_name} as {scan.key} "
              f"({len(scan.streams)} streams) -> {scan.path}")
        for what, why in archived.not_replayable.items():
            print(f"not replayed: {what}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
