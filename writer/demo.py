"""The README's first command: a private Redis, a producer and a reader of a small scan."""

import sys
import threading

import numpy as np

from blissdata import DataStore, ScanState
from blissdata.redis_server import EmbeddedRedis


def main(argv=None) -> int:
    with EmbeddedRedis() as server:
        print(f"embedded Redis-compatible server at {server.url}")
        store = DataStore(server.url)
        scan = store.create_scan(
            {"session": "demo", "name": "ascan", "number": 1, "path": "/tmp/demo/data.h5"},
            info={"title": "ascan sy 0 1 10 0.1", "type": "ascan", "scan_nb": 1,
                  "npoints": 10})
        motor = scan.create_stream("axis:sy", "float64")
        diode = scan.create_stream("diode:diode", "float64")
        reader_lines = []

        def read():
            live = store.load_scan(scan.key)
            while live.state < ScanState.PREPARED:
                live.update(timeout=5)
            cursor = live.cursor()
            while len(cursor.ended) < len(live.streams):
                for name, view in cursor.read(timeout=1).items():
                    reader_lines.append(f"  reader got {name}[{view.index}:"
                                        f"{view.index + len(view)}] = {np.round(view.data, 3)}")

        reader = threading.Thread(target=read)
        reader.start()
        scan.prepare()
        scan.start()
        for i in range(10):
            scan.send_many({motor: i / 9, diode: np.sin(i / 3)})
        scan.stop()
        scan.close()
        reader.join(10)
        print(f"producer published scan {scan.key}: 10 points on 2 streams")
        print("\n".join(reader_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
