"""Request counters and latency histograms in Prometheus' text exposition format.

Kept per server instance (not a process-global registry) so several apps in one process, as in
tests, do not share or clash over metric names.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


class Metrics:
    def __init__(self, prefix: str = "shardlight"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self._sums: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, tuple[str, float]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, method, status)] += 1
            counts = self._buckets[route]
            counts[next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))] += 1
            self._sums[route] += seconds

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self._gauges[name] = (help_text, value)

    def render(self) -> str:
        p = self.prefix
        lines = [f"# HELP {p}_requests_total HTTP requests by route, method and status.",
                 f"# TYPE {p}_requests_total counter"]
        with self._lock:
            for (route, method, status), n in sorted(self._requests.items()):
                lines.append(f'{p}_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
            lines += [f"# HELP {p}_request_seconds Request latency by route.",
                      f"# TYPE {p}_request_seconds histogram"]
            for route, counts in sorted(self._buckets.items()):
                total = 0
                for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts):
                    total += n
                    lines.append(f'{p}_request_seconds_bucket{{route="{route}",le="{bound}"}} {total}')
                lines.append(f'{p}_request_seconds_sum{{route="{route}"}} {self._sums[route]:.6f}')
                lines.append(f'{p}_request_seconds_count{{route="{route}"}} {total}')
        for name, (help_text, value) in sorted(self._gauges.items()):
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"
