"""Discovery services in background threads, for fixtures (in memory unless a store is
given: the store-parametrized fixtures in conftest.py pass one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from tests.control.discovery.threaded import ThreadedServer

Factory = Callable[..., ThreadedServer]


def service_factory(store: dict[str, Any] | None = None) -> Iterator[Factory]:
    """Body of a fixture: start services on 127.0.0.1 in threads, with the server options
    `store` (none: in memory) under each call's own; all stopped at teardown."""
    started: list[ThreadedServer] = []

    def factory(port: int = 0, **options: Any) -> ThreadedServer:
        server = ThreadedServer(**(store or {}) | options)
        server.start("127.0.0.1", port)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
