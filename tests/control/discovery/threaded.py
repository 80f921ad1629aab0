"""The discovery service on a private event loop in a background thread.

The tests are synchronous functions; this runs the service next to them. Only tests
need it: the service itself runs inside its own loop (`start_async`/`stop_async`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from control.discovery.server import DiscoveryServer

T = TypeVar("T")


class ThreadedServer(DiscoveryServer):
    """`start()` runs the service in a daemon thread, `stop()` ends it, and `call(fn)`
    runs `fn` on the service's loop, where the State may be touched without locks."""

    _own_loop: asyncio.AbstractEventLoop | None = None
    _own_thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving; returns the bound port, or raises what start_async raised."""
        started = threading.Event()
        result: dict[str, Any] = {}
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                result["port"] = loop.run_until_complete(self.start_async(host, port))
            except BaseException as exc:  # reported to the caller of start()
                result["error"] = exc
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            # As asyncio.run does: nothing left pending for the garbage collector to finalize.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._own_loop = loop
        self._own_thread = threading.Thread(target=run, name="discovery-server", daemon=True)
        self._own_thread.start()
        started.wait()
        if "error" in result:
            self._own_thread.join()
            self._own_thread = None
            raise result["error"]
        return result["port"]

    def stop(self) -> None:
        if self._own_thread is None or self._own_loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._own_loop).result(timeout=30)
        self._own_loop.call_soon_threadsafe(self._own_loop.stop)
        self._own_thread.join(timeout=30)
        self._own_thread = None

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the service's loop (from another thread) and return its result."""
        if self._own_loop is None or self._own_thread is None:
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._own_loop).result(timeout=30)

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` on the service's loop (from another thread), e.g. a store call."""
        if self._own_loop is None or self._own_thread is None:
            raise RuntimeError("the service is not running")

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._own_loop).result(timeout=30)
