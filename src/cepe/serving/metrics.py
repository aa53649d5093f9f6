"""Counters for `GET /metrics` (Prometheus text format) and JSON-lines logging."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict, deque
from datetime import datetime, timezone

RATE_WINDOW_S = 10.0


class Metrics:
    """Thread-safe counters shared by the HTTP handlers and the model worker."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (route, status) -> count
        self.request_seconds: dict[str, float] = defaultdict(float)
        self.counters: dict[str, float] = defaultdict(float)
        self._recent_tokens: deque[tuple[float, int]] = deque()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.request_seconds[route] += seconds

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def generated(self, n_tokens: int) -> None:
        """Record tokens produced by one decoding step of a batch."""
        now = time.monotonic()
        with self._lock:
            self.counters["generated_tokens"] += n_tokens
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
        """Prometheus text exposition: counters plus the `gauges` sampled by the caller."""
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP cepe_{name} {help_}")
            lines.append(f"# TYPE cepe_{name} {kind}")
            for labels, value in samples:
                lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
                lines.append(f"cepe_{name}{lab} {value:g}" if isinstance(value, float) else f"cepe_{name}{lab} {value}")

        with self._lock:
            reqs = sorted(self.requests.items())
            secs = sorted(self.request_seconds.items())
            counters = dict(self.counters)
        metric("requests_total", "counter", "HTTP requests by route and status",
               [({"route": r, "status": s}, n) for (r, s), n in reqs])
        metric("request_seconds_total", "counter", "time spent answering HTTP requests, by route",
               [({"route": r}, float(v)) for r, v in secs])
        described = {
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
        }
        for name, help_ in described.items():
            metric(f"{name}_total", "counter", help_, [({}, float(counters.get(name, 0)))])
        metric("tokens_per_second", "gauge", f"generated tokens per second over the last {RATE_WINDOW_S:g} s",
               [({}, float(round(self.tokens_per_second(), 3)))])
        for name, value in gauges.items():
            metric(name, "gauge", name.replace("_", " "), [({}, value)])
        metric("uptime_seconds", "gauge", "seconds since start", [({}, float(round(time.time() - self.started, 1)))])
        return "\n".join(lines) + "\n"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


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
