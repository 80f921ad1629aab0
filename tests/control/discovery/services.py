"""In-memory services only, for tests of what does not depend on the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from tests.control.discovery.threaded import ThreadedServer

Factory = Callable[..., ThreadedServer]


def service_factory() -> Iterator[Factory]:
    """Body of a fixture: start services on 127.0.0.1 in threads; stopped at teardown."""
    started: list[ThreadedServer] = []

    def factory(port: int = 0, **options: Any) -> ThreadedServer:
        server = ThreadedServer(**options)
        server.start("127.0.0.1", port)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
