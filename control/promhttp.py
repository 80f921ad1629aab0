"""Serve Prometheus metrics with prometheus_client, from state owned by an asyncio loop.

Used by the agent (``--metrics-listen``) and the discovery service (``--metrics``). Each
server has its own ``CollectorRegistry`` so several can run in one process (tests).

prometheus_client's HTTP server answers in its own threads, but the values it reports
live in objects only the event loop may touch (dicts it mutates between awaits). So the
one collector builds its metric families on the loop, at scrape time, and hands the
finished list to the HTTP thread.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# How long a scrape waits for the loop, and for a slow client to send its request.
SCRAPE_TIMEOUT = 10.0

# A builder may be a coroutine function (a store read over the network, say).
Families = Callable[[], Iterable[Metric] | Awaitable[Iterable[Metric]]]


class LoopCollector(Collector):
    """Calls ``build`` on ``loop`` whenever the registry is collected."""

    def __init__(self, loop: asyncio.AbstractEventLoop, build: Families) -> None:
        self._loop = loop
        self._build = build

    def collect(self) -> Iterator[Metric]:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting for ourselves would deadlock
            built = self._build()
            if inspect.isawaitable(built):
                if inspect.iscoroutine(built):
                    built.close()  # never to be awaited
                raise RuntimeError("an async metrics builder cannot be collected on its loop")
            return iter(list(built))

        async def build() -> list[Metric]:
            built = self._build()
            if inspect.isawaitable(built):
                built = await built
            return list(built)

        future = asyncio.run_coroutine_threadsafe(build(), self._loop)
        return iter(future.result(SCRAPE_TIMEOUT))


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6  # read while binding, so it has to be on the class


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # a client that stalls mid-request loses its thread

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


def _only_metrics_path(app: WSGIApplication) -> WSGIApplication:
    # prometheus_client answers on any path; we keep /metrics the only one.
    def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        return app(environ, start_response)

    return wrapped


class MetricsServer:
    """GET /metrics (anything else is 404), served from prometheus_client's threaded server."""

    def __init__(self, build: Families) -> None:
        self.registry = CollectorRegistry()
        self._build = build
        self._httpd: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: any free one); returns the bound port."""
        self.registry.register(LoopCollector(asyncio.get_running_loop(), self._build))
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = _Server6 if family == socket.AF_INET6 else ThreadingWSGIServer
        app = _only_metrics_path(make_wsgi_app(self.registry))
        self._httpd = make_server(str(sockaddr[0]), port, app, server_class, _Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        return int(self._httpd.server_address[1])

    async def stop(self) -> None:
        if self._httpd is None:
            return
        httpd, self._httpd = self._httpd, None
        # shutdown() waits for serve_forever to notice, which can take its poll interval.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
