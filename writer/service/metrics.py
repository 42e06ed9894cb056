"""Prometheus metrics of the writer (opt-in: `[metrics] enabled = true` in the config)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("blisswriter")


class MetricsError(RuntimeError):
    """The metrics endpoint cannot start (e.g. its port is in use)."""


class WriterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.scans_active = Gauge("blisswriter_scans_active", "Scans being written", registry=r)
        self.scans_finished = Counter("blisswriter_scans_finished", "Scans finished, by state",
                                      ["state"], registry=r)
        self.points = Counter("blisswriter_points_written", "Points made durable in files",
                              registry=r)
        self.bytes = Counter("blisswriter_bytes_written",
                             "Uncompressed bytes made durable in files", registry=r)
        self.lag_points = Gauge("blisswriter_lag_points",
                                "Points published but not yet durable, all scans", ["scan"],
                                registry=r)
        # points lost in Redis (trimmed before the writer stored them): each gap is also an
        # ERROR log line naming scan, stream and range, and the scan ends "failed"
        self.gaps = Counter("blisswriter_gaps",
                            "Ranges of points trimmed from Redis before the writer stored them",
                            registry=r)
        self.points_lost = Counter("blisswriter_points_lost",
                                   "Points trimmed from Redis before the writer stored them "
                                   "(fill values in the file)", registry=r)
        self.scans_gone = Counter("blisswriter_scans_gone",
                                  "Scans gone from Redis while being written (deleted, or "
                                  "Redis restarted without its data)", registry=r)
        self.redis_memory = Gauge("blisswriter_redis_used_memory_bytes",
                                  "Redis used_memory as last seen by the writer", registry=r)
        # the writer pool (several writers on the same sessions, writer/state/pool.py)
        self.writers_alive = Gauge("blisswriter_pool_writers_alive",
                                   "Writers whose heartbeat is within their lease ttl",
                                   registry=r)
        self.scans_held = Gauge("blisswriter_pool_scans_held",
                                "Scans whose lease this writer holds", registry=r)
        self.takeovers = Counter("blisswriter_pool_takeovers",
                                 "Scans taken over from a writer that stopped renewing",
                                 registry=r)
        self.leases_lost = Gauge("blisswriter_pool_leases_lost",
                                 "File leases this writer lost to another one", registry=r)
        self.server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"metrics endpoint cannot listen on {host}:{port}: {exc} "
                               f"(set [metrics] port in the config)") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
