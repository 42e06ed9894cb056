"""Publishing throughput of blissdata against raw pipelined XADD of the same bytes.

    python bench/bench_publish.py [--frames 400] [--json bench/results/publish.json]

Runs on a private embedded server (or --redis URL). Every figure is measured in the same run
as its baseline, so the ratio is what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, detector_frames, print_table, write_json  # noqa: E402

from blissdata import DataStore  # noqa: E402
from blissdata import bslz4  # noqa: E402
from blissdata.stream import guarded_xadds  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402

CHANNELS, BATCH = 64, 100


def new_scan(store, n):
    return store.create_scan({"session": "bench", "name": "bench", "number": n, "path": "/x"},
                             {"title": "bench", "type": "bench", "scan_nb": n})


def run(url: str, n_frames: int, n_scalar_batches: int, repeats: int) -> list[dict]:
    store = DataStore(url)
    r = redis.Redis.from_url(url)
    frames = detector_frames(n_frames)
    frame_bytes = frames[0].nbytes
    chunks = [bslz4.compress(f) for f in frames]
    rows = []
    counter = iter(range(1, 10**6))

    def raw_frames(depth):
        def go():
            r.flushall()
            pipe = r.pipeline(transaction=False)
            for i, f in enumerate(frames):
                pipe.xadd("raw", {"d": memoryview(f).cast("B"), "n": 1}, id=f"{i}-1")
                if (i + 1) % depth == 0:
                    pipe.execute()
            pipe.execute()
        return go

    def lib_frames(batch):
        def go():
            r.flushall()
            store._check_protocol()
            scan = new_scan(store, next(counter))
            s = scan.create_stream("cam", "uint16", frames.shape[1:])
            scan.prepare()
            for i in range(0, n_frames, batch):
                s.send(frames[i:i + batch] if batch > 1 else frames[i])
        return go

    t_raw = best_of(repeats, raw_frames(16))
    mb = n_frames * frame_bytes / 1e6
    rows.append({"case": "frames 512x512 u16: raw XADD, pipelined 16 deep (baseline)",
                 "MB/s": mb / t_raw, "per s": n_frames / t_raw, "ratio": 1.0})
    for batch in (1, 16):
        t = best_of(repeats, lib_frames(batch))
        rows.append({"case": f"frames: Stream.send, {batch} frame(s) per call",
                     "MB/s": mb / t, "per s": n_frames / t, "ratio": t_raw / t})

    # pre-compressed frames
    def raw_chunks():
        r.flushall()
        pipe = r.pipeline(transaction=False)
        for i, c in enumerate(chunks):
            pipe.xadd("rawz", {"d": c, "n": 1}, id=f"{i}-1")
            if (i + 1) % 16 == 0:
                pipe.execute()
        pipe.execute()

    def lib_chunks():
        r.flushall()
        store._check_protocol()
        scan = new_scan(store, next(counter))
        s = scan.create_stream("cam", "uint16", frames.shape[1:], encoding="bslz4")
        scan.prepare()
        for i in range(0, n_frames, 16):
            s.send_chunks(chunks[i:i + 16])
        return s.key

    t_rawz = best_of(repeats, raw_chunks)
    rows.append({"case": "bslz4 frames: raw XADD of the chunks (baseline)",
                 "MB/s": mb / t_rawz, "per s": n_frames / t_rawz, "ratio": 1.0})
    t_z = best_of(repeats, lib_chunks)
    key = lib_chunks()
    mem_z = r.memory_usage(key, samples=0) / n_frames
    rows.append({"case": "bslz4 frames: Stream.send_chunks, 16 per call (MB/s uncompressed)",
                 "MB/s": mb / t_z, "per s": n_frames / t_z, "ratio": t_rawz / t_z,
                 "Redis bytes/frame": mem_z})
    lib_frames(16)()
    key_raw = store.load_scan(store.get_last_scan()).streams["cam"].key
    mem_raw = r.memory_usage(key_raw, samples=0) / n_frames
    rows[2]["Redis bytes/frame"] = mem_raw
    rows[-1]["memory vs raw"] = mem_z / mem_raw

    # scalars: 64 float64 channels, batches of 100 points
    batch = np.random.default_rng(0).random(BATCH)

    def raw_scalars():
        r.flushall()
        pipe = r.pipeline(transaction=False)
        payload = memoryview(batch).cast("B")
        for b in range(n_scalar_batches):
            for c in range(CHANNELS):
                pipe.xadd(f"c{c}", {"d": payload, "n": BATCH}, id=f"{b * BATCH}-1")
            pipe.execute()

    def lib_scalars():
        r.flushall()
        store._check_protocol()
        scan = new_scan(store, next(counter))
        streams = [scan.create_stream(f"c{c}", "float64") for c in range(CHANNELS)]
        scan.prepare()
        for b in range(n_scalar_batches):
            scan.send_many({s: batch for s in streams})

    points = n_scalar_batches * BATCH
    t_raws = best_of(repeats, raw_scalars)
    rows.append({"case": "scalars 64 ch x batches of 100: raw XADD, one pipeline per batch "
                 "(baseline)", "per s": points * CHANNELS / t_raws, "points/s": points / t_raws,
                 "ratio": 1.0})
    t_s = best_of(repeats, lib_scalars)
    rows.append({"case": "scalars: Scan.send_many (values/s = points x channels)",
                 "per s": points * CHANNELS / t_s, "points/s": points / t_s,
                 "ratio": t_raws / t_s})

    # what the scan-exists check costs (docs/protocol.md): the same MULTI/EXEC of XADDs, with
    # and without the guard script in front, interleaved so both see the same machine
    r.flushall()
    r.hset("guard:scan", "x", 1)
    small = {"d": memoryview(batch).cast("B"), "n": BATCH}
    for label, n_keys in (("1 stream", 1), ("64 streams", CHANNELS)):
        stream_keys = [f"guard:scan:{n_keys}:{c}" for c in range(n_keys)]
        for k in stream_keys:
            r.xadd(k, {"n": 0}, id="0-1")
        ids = iter(range(2, 10**9))

        def plain():
            for _ in range(n_scalar_batches):
                i = next(ids)
                pipe = r.pipeline(transaction=True)
                for k in stream_keys:
                    pipe.xadd(k, small, id=f"{i}-1")
                pipe.execute()

        def guarded():
            for _ in range(n_scalar_batches):
                i = next(ids)
                guarded_xadds(r, "guard:scan", stream_keys, 0,
                              [(k, f"{i}-1", small) for k in stream_keys])

        t_plain = t_guard = float("inf")
        for _ in range(repeats * 3):
            t_plain = min(t_plain, best_of(1, plain))
            t_guard = min(t_guard, best_of(1, guarded))
        rows.append({"case": f"MULTI/EXEC of XADDs to {label}, batches of 100 (baseline)",
                     "per s": n_scalar_batches / t_plain, "ratio": 1.0})
        rows.append({"case": "  the same with the scan-exists guard (every send)",
                     "per s": n_scalar_batches / t_guard, "ratio": t_plain / t_guard})
    r.flushall()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--scalar-batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", help="external server URL (default: embedded)")
    parser.add_argument("--json", default="bench/results/publish.json")
    args = parser.parse_args(argv)
    if args.redis:
        rows = run(args.redis, args.frames, args.scalar_batches, args.repeats)
    else:
        with EmbeddedRedis() as server:
            rows = run(server.url, args.frames, args.scalar_batches, args.repeats)
    print_table("Publishing throughput (ratio = baseline time / our time, same run)", rows,
                ["case", "MB/s", "per s", "points/s", "ratio", "Redis bytes/frame",
                 "memory vs raw"])
    write_json(args.json, "publish", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
