"""Replay at full speed against the core publishing throughput of the same data, in one run.

    python bench/bench_replay.py [--frames 300] [--json bench/results/replay.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import best_of, detector_frames, print_table, write_json  # noqa: E402

from blissdata import DataStore  # noqa: E402
from blissdata.archive import open_scan  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402
from blissdata.replay import replay  # noqa: E402
from writer_helpers import start_writer, wait_status  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--json", default="bench/results/replay.json")
    args = parser.parse_args(argv)
    frames = detector_frames(args.frames)
    mb = frames.nbytes / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        store = DataStore(server.url)
        counter = iter(range(1, 10**6))

        def publish(encoding):
            n = next(counter)
            scan = store.create_scan({"session": "p", "name": "t", "number": n,
                                      "path": f"{tmp}/src_{encoding}.h5"},
                                     {"title": "t", "type": "t", "scan_nb": n})
            s = scan.create_stream("cam", "uint16", frames.shape[1:], encoding=encoding)
            scan.prepare()
            scan.start()
            for i in range(0, len(frames), 4):
                s.send(frames[i:i + 4])
            scan.close()
            return scan

        t_pub = best_of(3, lambda: store.delete_scan(publish("numeric").key))
        service, thread = start_writer(server.url, tmp)
        time.sleep(0.3)
        sources = {enc: publish(enc) for enc in ("numeric", "bslz4")}
        for scan in sources.values():
            wait_status(store, scan.key, timeout=120)
        service.stop()
        thread.join(30)
        rows.append({"case": "publish frames, Stream.send 4 per call (core baseline)",
                     "MB/s": mb / t_pub, "ratio": 1.0})
        for enc, scan in sources.items():
            archived = open_scan(scan.path, f"{scan.number}.1")
            def once():
                store.delete_scan(replay(store, archived, session="r",
                                         path=f"{tmp}/replay_{enc}.h5").key)

            t = best_of(3, once)
            archived.close()
            rows.append({"case": f"replay at full speed, file stored {enc}"
                         + (" (chunks sent as stored)" if enc == "bslz4" else ""),
                         "MB/s": mb / t, "ratio": t_pub / t})
    print_table("Replay (ratio = publish time / replay time, same run)", rows,
                ["case", "MB/s", "ratio"])
    write_json(args.json, "replay", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
