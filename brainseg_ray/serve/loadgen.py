"""A bounded HTTP load generator: N client threads, each with its own keep-alive connection,
sending the same request until a deadline or a request count. For the tests and bench/serve.py;
it only talks to the URL it is given (a loopback address in both)."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    statuses: Counter = field(default_factory=Counter)  # status code -> count (0: no answer)
    latencies_ms: list[float] = field(default_factory=list)  # answered requests only
    problems: list[str] = field(default_factory=list)  # connection errors and malformed answers

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def rps(self) -> float:
        return self.statuses.get(200, 0) / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 or status == 0)


def run_load(url: str, body: bytes, headers: dict[str, str], *, clients: int, duration_s: float,
             max_requests: int = 1_000_000, check: Callable[[int, bytes], str | None] | None = None,
             timeout_s: float = 60.0, method: str = "POST") -> LoadResult:
    """`clients` threads send `method url` with `body` until `duration_s` has passed or
    `max_requests` were sent in all. `check(status, body)` returns a problem description or None."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    result = LoadResult(clients=clients, duration_s=0.0)
    lock = threading.Lock()
    sent = 0
    deadline = time.perf_counter() + duration_s

    def client() -> None:
        nonlocal sent
        connection = None
        while time.perf_counter() < deadline:
            with lock:
                if sent >= max_requests:
                    return
                sent += 1
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                if connection is not None:
                    connection.close()
                connection = None
                with lock:
                    result.statuses[0] += 1
                    result.problems.append(f"no answer: {type(exc).__name__}: {exc}")
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            problem = check(status, data) if check else None
            with lock:
                result.statuses[status] += 1
                result.latencies_ms.append(elapsed_ms)
                if problem:
                    result.problems.append(problem)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout_s + 5)
    result.duration_s = time.perf_counter() - started
    return result
