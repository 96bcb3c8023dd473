"""Per-request timings of a benchmark phase, shared by bench/serve_throughput.py and bench/cpu_engines.py."""

import collections
import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Timing:
    """Per-request figures of one phase."""

    def __init__(self):
        self.latencies, self.first_tokens, self.tokens, self.errors = [], [], 0, collections.Counter()

    def summary(self, name: str, seconds: float) -> dict:
        latencies = self.latencies or [float("nan")]
        return {"name": name, "requests": len(self.latencies), "errors": sum(self.errors.values()),
                "req_s": len(self.latencies) / seconds, "tok_s": self.tokens / seconds,
                "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
                "ttft_ms": 1000 * statistics.median(self.first_tokens or latencies)}
