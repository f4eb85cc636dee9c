"""Request accounting: Prometheus metrics (own registry), a JSON stats view and an optional JSONL log."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter as Tally
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, request_log: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.running = Gauge(
            "offline_model_requests_running", "Chat completions in progress", ["kind"], registry=self.registry
        )
        self.requests = Counter(
            "offline_model_requests", "Chat completions answered, by kind and HTTP status", ["kind", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "offline_model_tokens", "Tokens counted, by type (prompt or completion)", ["type"], registry=self.registry
        )
        self.duration = Histogram(
            "offline_model_request_duration_seconds", "Chat completion duration", ["kind"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.request_log = request_log
        self._lock = threading.Lock()
        self._running_now = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_kind: Tally[str] = Tally()
            self.by_status: Tally[str] = Tally()
            self.faults: Tally[str] = Tally()
            self.total = 0
            self.prompt_tokens = 0
            self.completion_tokens = 0
            self.rejected = 0
            self.max_running = self._running_now

    def started(self, kind: str) -> None:
        self.running.labels(kind).inc()
        with self._lock:
            self._running_now += 1
            self.max_running = max(self.max_running, self._running_now)

    def finished(self, kind: str) -> None:
        self.running.labels(kind).dec()
        with self._lock:
            self._running_now -= 1

    def record(
        self,
        *,
        kind: str,
        status: int,
        model: str = "",
        stream: bool = False,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        seconds: float = 0.0,
        fault: str | None = None,
        rejected: bool = False,
    ) -> None:
        self.requests.labels(kind, str(status)).inc()
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)
        self.duration.labels(kind).observe(seconds)
        with self._lock:
            self.total += 1
            self.by_kind[kind] += 1
            self.by_status[str(status)] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if fault:
                self.faults[fault] += 1
            if rejected:
                self.rejected += 1
        if self.request_log is not None:
            entry = {
                "ts": round(time.time(), 3),
                "kind": kind,
                "status": status,
                "model": model,
                "stream": stream,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "seconds": round(seconds, 4),
                "fault": fault,
            }
            with self._lock, self.request_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self.total,
                "by_kind": dict(sorted(self.by_kind.items())),
                "by_status": dict(sorted(self.by_status.items())),
                "faults": dict(sorted(self.faults.items())),
                "rejected_concurrency": self.rejected,
                "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
                "running": self._running_now,
                "max_running": self.max_running,
            }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
