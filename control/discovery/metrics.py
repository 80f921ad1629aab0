"""Prometheus text exposition of the service's state and counters, over a tiny HTTP server.

Metric names follow Sidero's discovery-service (discovery_state_*), plus request
counters by method and status code. Only ``GET /metrics`` is served; anything else is
404, and a request that is slow or oversized is dropped.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from control.discovery.state import State


class RequestCounters:
    def __init__(self) -> None:
        # Keys come from a fixed set (method names x status codes), so this stays small.
        self.handled: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, method: str, code: str) -> None:
        self.handled[(method, code)] += 1


def render(state: State, requests: RequestCounters) -> str:
    s = state.stats()
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    metric(
        "discovery_state_clusters",
        "gauge",
        "The current number of clusters in the state.",
        [("", s.clusters)],
    )
    metric(
        "discovery_state_affiliates",
        "gauge",
        "The current number of affiliates in the state.",
        [("", s.affiliates)],
    )
    metric(
        "discovery_state_endpoints",
        "gauge",
        "The current number of endpoints in the state.",
        [("", s.endpoints)],
    )
    metric(
        "discovery_state_subscriptions",
        "gauge",
        "The current number of subscriptions in the state.",
        [("", s.subscriptions)],
    )
    metric(
        "discovery_state_gc_runs_total", "counter", "The number of GC runs.", [("", state.gc_runs)]
    )
    metric(
        "discovery_state_gc_clusters_total",
        "counter",
        "The total number of GC'ed clusters.",
        [("", state.gc_clusters)],
    )
    metric(
        "discovery_state_gc_affiliates_total",
        "counter",
        "The total number of GC'ed affiliates.",
        [("", state.gc_affiliates)],
    )
    metric(
        "discovery_server_requests_total",
        "counter",
        "gRPC requests handled, by method and status code.",
        [(f'{{method="{m}",code="{c}"}}', n) for (m, c), n in sorted(requests.handled.items())],
    )
    return "\n".join(lines) + "\n"


async def serve_metrics(host: str, port: int, body: Callable[[], str]) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                payload, status = body().encode(), b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                payload, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + payload
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=8192)
