"""`GET /metrics` through `prometheus_client` (a registry per app), and JSON-lines logging.

Counters (`cepe_*_total`), latency histograms (time to first token, inter-token, end to end,
per request), and gauges sampled at scrape time from the service (queue, store).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

RATE_WINDOW_S = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
COUNTERS = {
    "generated_tokens": "tokens generated",
    "prompt_tokens": "prompt tokens prefilled",
    "context_tokens": "context tokens attended by generation requests",
    "encoded_tokens": "context tokens run through the encoder",
    "encode_seconds": "seconds spent encoding context",
    "batches": "model batches run",
    "batched_requests": "requests run in those batches (batched_requests / batches = mean batch size)",
    "rejected": "requests refused because the queue was full (429)",
    "timeouts": "requests that ran out of time (504)",
    "cancelled": "requests whose client went away before the answer",
    "store_hits": "context uploads answered from the store without encoding",
    "graph_captures": "decoding steps captured as CUDA graphs (one per bucket of rows, columns and context)",
    "graph_capture_seconds": "seconds spent capturing them",
}


class Metrics:
    """Thread-safe metrics shared by the HTTP handlers and the model worker."""

    def __init__(self):
        self.started = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cepe_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Counter(
            "cepe_request_seconds", "time spent answering HTTP requests, by route", ["route"], registry=r
        )
        self.counters = {name: Counter(f"cepe_{name}", help_, registry=r) for name, help_ in COUNTERS.items()}
        self.ttft = Histogram("cepe_time_to_first_token_seconds", "request arrival to its first generated text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("cepe_inter_token_seconds", "time between a choice's successive text deltas",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("cepe_e2e_request_seconds", "request arrival to its last token (answered requests)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._gauges: dict[str, float] = {}
        self._render_lock = threading.Lock()  # one scrape at a time: the gauges belong to it
        r.register(_Gauges(self))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).inc(seconds)

    def add(self, name: str, value: float = 1) -> None:
        self.counters[name].inc(value)

    def generated(self, n_tokens: int) -> None:
        """Record tokens produced by one decoding step of a batch."""
        now = time.monotonic()
        self.counters["generated_tokens"].inc(n_tokens)
        with self._lock:
            self._recent_tokens.append((now, n_tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent_tokens and self._recent_tokens[0][0] < now - RATE_WINDOW_S:
            self._recent_tokens.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `RATE_WINDOW_S` seconds."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent_tokens) / RATE_WINDOW_S

    def render(self, gauges: dict[str, float]) -> str:
        """Prometheus text exposition, with `gauges` sampled by the caller."""
        with self._render_lock:
            self._gauges = dict(gauges)
            return generate_latest(self.registry).decode()


class _Gauges:
    """Gauges read at scrape time: throughput, uptime, and the service's queue and store figures."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        yield GaugeMetricFamily(
            "cepe_tokens_per_second",
            f"generated tokens per second over the last {RATE_WINDOW_S:g} s",
            value=round(m.tokens_per_second(), 3),
        )
        for name, value in m._gauges.items():
            yield GaugeMetricFamily(f"cepe_{name}", name.replace("_", " "), value=value)
        yield GaugeMetricFamily("cepe_uptime_seconds", "seconds since start", value=round(time.time() - m.started, 1))


class RequestClock:
    """One request's latencies: time to first token, between tokens (per choice), end to end."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start = metrics, time.perf_counter()
        self._last: dict[int, float] = {}

    def delta(self, index: int) -> None:
        now = time.perf_counter()
        if not self._last:
            self.metrics.ttft.observe(now - self.start)
        if index in self._last:
            self.metrics.inter_token.observe(now - self._last[index])
        self._last[index] = now

    def done(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def json_logging_on() -> bool:
    """Whether `setup_json_logging` routes this process's logs (a model worker process then does too)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Route every logger (uvicorn's included) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
