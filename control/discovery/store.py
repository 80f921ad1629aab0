"""Where the discovery service keeps its state: the seam between the gRPC server and storage.

Two stores implement it with the same rules (see state.py):
- ``MemoryStore``: the State in this process (the default; snapshots to a file);
- ``ValkeyStore`` (valkey.py): every replica on one Valkey/Redis, any replica serving any
  cluster.

Every method runs on the server's event loop. A store that cannot reach its backend
raises ``StoreUnavailable`` (the server answers UNAVAILABLE); refusals are ``LimitError``.
"""

from __future__ import annotations

import builtins
import collections
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from control.discovery.state import (
    AffiliateView,
    Limits,
    Notification,
    State,
    Stats,
    check_cluster_id,
)


class StoreUnavailable(Exception):
    """The shared store cannot be reached now; the caller may retry later."""


class Watcher(Protocol):
    """One Watch's bounded queue of changes, filled by the store."""

    queue: collections.deque[Notification]
    overflowed: bool  # changes were lost (slow reader or a gap): the watch must end
    unavailable: bool  # the store failed under the watch: it must end
    closed: bool

    def close(self) -> None: ...


class Store(ABC):
    limits: Limits

    @abstractmethod
    async def start(self) -> None:
        """Connect (a store whose backend is down still starts, and serves UNAVAILABLE)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; watchers are ended by the server before this."""

    def check_cluster_id(self, cluster_id: str) -> None:
        check_cluster_id(self.limits, cluster_id)

    @abstractmethod
    async def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: list[bytes],
        ttl: float,
    ) -> None: ...

    @abstractmethod
    async def delete(self, cluster_id: str, affiliate_id: str) -> None: ...

    @abstractmethod
    async def list(self, cluster_id: str) -> list[AffiliateView]: ...

    @abstractmethod
    async def subscribe(
        self, cluster_id: str, wakeup: Callable[[], None]
    ) -> tuple[builtins.list[AffiliateView], Watcher]:
        """The current snapshot and every later change, none missed and none twice."""

    @abstractmethod
    async def gc(self) -> tuple[int, int]:
        """Drop what expired; returns (clusters removed, affiliates removed)."""

    @abstractmethod
    async def stats(self) -> Stats: ...

    @abstractmethod
    def gc_totals(self) -> tuple[int, int, int]:
        """GC runs, clusters and affiliates removed, by this process so far."""

    def other_watchers(self) -> int:
        """Watches open on the other replicas of a shared store, as last heard (0: alone).

        The server spaces watch messages by every replica's watches together (fanout.Pace).
        """
        return 0

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers now (health checks)."""

    @abstractmethod
    async def dump(self) -> object:
        """Everything stored, expiry times included, comparable with ``==`` (tests, debugging)."""


class MemoryStore(Store):
    """The State of this process; ``clock`` gives its ``now`` (monotonic seconds)."""

    def __init__(self, state: State, clock: Callable[[], float]) -> None:
        self.state = state
        self.limits = state.limits
        self.clock = clock

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass  # always here

    def gc_totals(self) -> tuple[int, int, int]:
        return self.state.gc_runs, self.state.gc_clusters, self.state.gc_affiliates

    async def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: list[bytes],
        ttl: float,
    ) -> None:
        self.state.update(cluster_id, affiliate_id, data, endpoints, ttl, self.clock())

    async def delete(self, cluster_id: str, affiliate_id: str) -> None:
        self.state.delete(cluster_id, affiliate_id)

    async def list(self, cluster_id: str) -> list[AffiliateView]:
        return self.state.list(cluster_id)

    async def subscribe(
        self, cluster_id: str, wakeup: Callable[[], None]
    ) -> tuple[builtins.list[AffiliateView], Watcher]:
        return self.state.subscribe(cluster_id, wakeup)

    async def gc(self) -> tuple[int, int]:
        return self.state.gc(self.clock())

    async def stats(self) -> Stats:
        return self.state.stats()

    async def dump(self) -> object:
        return self.state.export_snapshot(0.0)  # TTLs from time 0: absolute expiry times
