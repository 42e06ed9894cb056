"""Prometheus metrics of the memory tracker (`blissdata-memory-tracker --metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrackerMetrics:
    """Served on 127.0.0.1:`port`; `observe(tracker, used)` after each round, `lost(n)` at
    each trim of points no file held."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.registry = r = CollectorRegistry()
        self.used = Gauge("blissdata_tracker_redis_used_memory_bytes",
                          "Redis used_memory as last seen by the tracker", registry=r)
        self.budget = Gauge("blissdata_tracker_budget_bytes",
                            "Above it, points already in a file are trimmed", registry=r)
        self.hard_limit = Gauge("blissdata_tracker_hard_limit_bytes",
                                "Above it, points no file holds are trimmed (lost)",
                                registry=r)
        self.above_hard_limit = Gauge("blissdata_tracker_above_hard_limit",
                                      "1 while Redis uses more than the hard limit",
                                      registry=r)
        self.lost_trims = Counter("blissdata_tracker_lost_trims",
                                  "Trims of points no file held yet (each logged as an ERROR)",
                                  registry=r)
        self.lost_points = Counter("blissdata_tracker_lost_points",
                                   "Points trimmed before any file held them", registry=r)
        self.server, _ = start_http_server(port, addr=host, registry=r)

    def observe(self, tracker, used: int) -> None:
        self.used.set(used)
        self.budget.set(tracker.budget)
        self.hard_limit.set(tracker.hard_limit)
        self.above_hard_limit.set(1 if used > tracker.hard_limit else 0)

    def lost(self, points: int) -> None:
        self.lost_trims.inc()
        self.lost_points.inc(points)

    def stop(self) -> None:
        self.server.shutdown()
