"""The discovery service's state: clusters of affiliates of opaque blobs.

No I/O and no clock reads: every call that cares about time takes ``now`` (seconds, any
monotonic origin). The server owns one State and touches it from one event loop only.

Rules (from Sidero's discovery-service, with one difference noted below):
- An update creates the affiliate if needed, replaces its data when data is given, and
  merges endpoints by byte equality; each endpoint keeps its own expiry, extended (never
  shortened) by a later update carrying it. The affiliate lives until the latest expiry
  of its data/endpoint updates.
- Garbage collection drops expired affiliates (watchers get ``deleted``), expired
  endpoints (watchers get the updated affiliate), and clusters with no affiliates and
  no watchers.
- A request that breaks a limit changes nothing. (The reference can half-apply an update
  whose endpoints overflow; we check before touching anything.)
- A watcher has a bounded queue; if it overflows, the watcher is cut off and told so,
  so a slow reader costs bounded memory.
"""

from __future__ import annotations

import builtins
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from control.discovery.proto import storage_pb2 as spb


@dataclass(frozen=True)
class Limits:
    cluster_id_max: int = 256
    affiliate_id_max: int = 256
    affiliate_data_max: int = 2048
    endpoint_max: int = 32
    endpoints_per_affiliate: int = 64
    affiliates_per_cluster: int = 1024
    ttl_max: float = 30 * 60.0
    # Ours, so that many clusters or watchers cannot grow memory without bound.
    clusters_max: int = 100_000
    subscriptions_max: int = 100_000
    # Changes queued for one watcher. The server sends them batched (fanout.py), so a
    # watcher may fall a whole cluster behind (a restart's herd) before it is cut off.
    watch_buffer: int = 1024


class LimitError(Exception):
    """A request the service refuses.

    ``exhausted`` selects the ResourceExhausted status over InvalidArgument.
    """

    def __init__(self, message: str, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


def check_cluster_id(limits: Limits, cluster_id: str) -> None:
    if not cluster_id:
        raise LimitError("cluster ID can't be empty")
    if len(cluster_id.encode()) > limits.cluster_id_max:
        raise LimitError("cluster ID is too long")


def check_affiliate_id(limits: Limits, affiliate_id: str) -> None:
    if not affiliate_id:
        raise LimitError("affiliate ID can't be empty")
    if len(affiliate_id.encode()) > limits.affiliate_id_max:
        raise LimitError("affiliate ID is too long")


def check_update(
    limits: Limits,
    cluster_id: str,
    affiliate_id: str,
    data: bytes | None,
    endpoints: list[bytes],
    ttl: float,
) -> None:
    """The checks of an update that need no state (every store makes them first)."""
    check_cluster_id(limits, cluster_id)
    check_affiliate_id(limits, affiliate_id)
    if data is not None and len(data) > limits.affiliate_data_max:
        raise LimitError("affiliate data is too big")
    if any(len(e) > limits.endpoint_max for e in endpoints):
        raise LimitError("affiliate endpoint is too big")
    if ttl > limits.ttl_max:
        raise LimitError("ttl is too large")
    if ttl < 0:
        raise LimitError("ttl is negative")


@dataclass(frozen=True)
class AffiliateView:
    """An affiliate as sent to clients (a copy; safe to hand to another task)."""

    id: str
    data: bytes
    endpoints: tuple[bytes, ...]


@dataclass
class _Endpoint:
    data: bytes
    expiration: float


@dataclass
class _Affiliate:
    id: str
    expiration: float = 0.0
    data: bytes = b""
    endpoints: list[_Endpoint] = field(default_factory=list)
    # The last view, shared by every snapshot and notification until data or endpoints
    # change (whoever changes them clears it), so a watcher's snapshot costs no copies.
    cached_view: AffiliateView | None = field(default=None, repr=False, compare=False)

    def view(self) -> AffiliateView:
        if self.cached_view is None:
            endpoints = tuple(e.data for e in self.endpoints)
            self.cached_view = AffiliateView(self.id, self.data, endpoints)
        return self.cached_view


@dataclass(frozen=True)
class Notification:
    affiliate_id: str
    affiliate: AffiliateView | None  # None: deleted


class Subscription:
    """One watcher's bounded queue of notifications."""

    def __init__(
        self,
        cluster: _Cluster,
        buffer: int,
        wakeup: Callable[[], None],
        on_close: Callable[[], None],
    ) -> None:
        self._cluster = cluster
        self._on_close = on_close
        self._buffer = buffer
        self._wakeup = wakeup
        self.queue: collections.deque[Notification] = collections.deque()
        self.overflowed = False
        self.unavailable = False  # never here; a shared store's watch can lose its store
        self.closed = False

    def push(self, note: Notification) -> None:
        if self.closed:
            return
        if len(self.queue) >= self._buffer:
            self.overflowed = True
            self.queue.clear()
            self.close()
        else:
            self.queue.append(note)
        self._wakeup()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cluster.subscriptions.discard(self)
            self._on_close()


@dataclass
class _Cluster:
    id: str
    affiliates: dict[str, _Affiliate] = field(default_factory=dict)
    subscriptions: set[Subscription] = field(default_factory=set)

    def notify(self, note: Notification) -> None:
        for sub in list(self.subscriptions):
            sub.push(note)


# (cluster id, [(affiliate id, data, TTL s, [(endpoint, TTL s)])]): a snapshot's cluster.
ClusterRecord = tuple[str, list[tuple[str, bytes, int, list[tuple[bytes, int]]]]]


def encode_cluster_record(record: ClusterRecord) -> bytes:
    """One cluster as StateSnapshot bytes; a snapshot is the concatenation of its clusters."""
    snap = spb.StateSnapshot()
    cluster_id, affiliates = record
    cs = snap.clusters.add(id=cluster_id)
    for aid, data, ttl, endpoints in affiliates:
        a = cs.affiliates.add(id=aid, data=data)
        a.ttl.seconds = ttl
        for ep, ep_ttl in endpoints:
            a.endpoints.add(data=ep).ttl.seconds = ep_ttl
    return snap.SerializeToString()


@dataclass
class Stats:
    clusters: int
    affiliates: int
    endpoints: int
    subscriptions: int


class State:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._clusters: dict[str, _Cluster] = {}
        self._subscriptions = 0
        self.gc_runs = 0
        self.gc_clusters = 0
        self.gc_affiliates = 0

    # -- validation -------------------------------------------------------------------

    def check_cluster_id(self, cluster_id: str) -> None:
        check_cluster_id(self.limits, cluster_id)

    def check_affiliate_id(self, affiliate_id: str) -> None:
        check_affiliate_id(self.limits, affiliate_id)

    def _cluster_for_write(self, cluster_id: str) -> _Cluster:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            if len(self._clusters) >= self.limits.clusters_max:
                raise LimitError("too many clusters", exhausted=True)
            cluster = self._clusters[cluster_id] = _Cluster(cluster_id)
        return cluster

    # -- operations -------------------------------------------------------------------

    def update(
        self,
        cluster_id: str,
        affiliate_id: str,
        data: bytes | None,
        endpoints: list[bytes],
        ttl: float,
        now: float,
    ) -> None:
        lim = self.limits
        check_update(lim, cluster_id, affiliate_id, data, endpoints, ttl)

        # Every check before the first change, so a refused request leaves no trace.
        cluster = self._clusters.get(cluster_id)
        affiliate = cluster.affiliates.get(affiliate_id) if cluster else None
        known = {e.data for e in affiliate.endpoints} if affiliate else set()
        fresh = list(dict.fromkeys(e for e in endpoints if e not in known))
        if (
            affiliate is None
            and cluster is not None
            and len(cluster.affiliates) >= lim.affiliates_per_cluster
        ):
            raise LimitError("too many affiliates in the cluster", exhausted=True)
        if len(known) + len(fresh) > lim.endpoints_per_affiliate:
            raise LimitError("too many endpoints for the affiliate", exhausted=True)
        if cluster is None:
            cluster = self._cluster_for_write(cluster_id)

        expiration = now + ttl
        changed = affiliate is None
        if affiliate is None:
            affiliate = cluster.affiliates[affiliate_id] = _Affiliate(affiliate_id)
        # Empty data counts as absent, as in the reference (proto3 cannot tell them apart
        # in every client).
        if data:
            changed |= affiliate.data != data
            affiliate.data = bytes(data)
            affiliate.expiration = expiration
        wanted = set(endpoints)
        for ep in affiliate.endpoints:
            if ep.data in wanted and ep.expiration < expiration:
                ep.expiration = expiration
        for e in fresh:
            affiliate.endpoints.append(_Endpoint(bytes(e), expiration))
            changed = True
        affiliate.expiration = max(affiliate.expiration, expiration)
        if changed:
            affiliate.cached_view = None
            cluster.notify(Notification(affiliate_id, affiliate.view()))

    def delete(self, cluster_id: str, affiliate_id: str) -> None:
        self.check_cluster_id(cluster_id)
        self.check_affiliate_id(affiliate_id)
        cluster = self._clusters.get(cluster_id)
        if cluster is not None and cluster.affiliates.pop(affiliate_id, None) is not None:
            cluster.notify(Notification(affiliate_id, None))

    def list(self, cluster_id: str) -> list[AffiliateView]:
        self.check_cluster_id(cluster_id)
        cluster = self._clusters.get(cluster_id)
        return [a.view() for a in cluster.affiliates.values()] if cluster else []

    def subscribe(
        self, cluster_id: str, wakeup: Callable[[], None]
    ) -> tuple[builtins.list[AffiliateView], Subscription]:  # `list` is the method above
        """The current snapshot plus a subscription to every later change, atomically."""
        self.check_cluster_id(cluster_id)
        if self.subscriptions_count() >= self.limits.subscriptions_max:
            raise LimitError("too many watchers", exhausted=True)
        cluster = self._cluster_for_write(cluster_id)
        sub = Subscription(cluster, self.limits.watch_buffer, wakeup, self._subscription_closed)
        cluster.subscriptions.add(sub)
        self._subscriptions += 1
        return [a.view() for a in cluster.affiliates.values()], sub

    def subscriptions_count(self) -> int:
        return self._subscriptions  # kept as a counter: Watch must not scan every cluster

    def _subscription_closed(self) -> None:
        self._subscriptions -= 1

    def gc(self, now: float) -> tuple[int, int]:
        """Drop what expired before ``now``; returns (clusters removed, affiliates removed)."""
        removed_clusters = removed_affiliates = 0
        for cid, cluster in list(self._clusters.items()):
            for aid, aff in list(cluster.affiliates.items()):
                if aff.expiration < now:
                    del cluster.affiliates[aid]
                    removed_affiliates += 1
                    cluster.notify(Notification(aid, None))
                    continue
                kept = [e for e in aff.endpoints if e.expiration > now]
                if len(kept) != len(aff.endpoints):
                    aff.endpoints = kept
                    aff.cached_view = None
                    cluster.notify(Notification(aid, aff.view()))
            if not cluster.affiliates and not cluster.subscriptions:
                del self._clusters[cid]
                removed_clusters += 1
        self.gc_runs += 1
        self.gc_clusters += removed_clusters
        self.gc_affiliates += removed_affiliates
        return removed_clusters, removed_affiliates

    def stats(self) -> Stats:
        affiliates = endpoints = subs = 0
        for c in self._clusters.values():
            affiliates += len(c.affiliates)
            endpoints += sum(len(a.endpoints) for a in c.affiliates.values())
            subs += len(c.subscriptions)
        return Stats(len(self._clusters), affiliates, endpoints, subs)

    # -- snapshot -------------------------------------------------------------------

    def export_snapshot(self, now: float) -> bytes:
        """Serialized StateSnapshot; lifetimes are stored as remaining TTLs (whole seconds)."""
        return b"".join(map(encode_cluster_record, self.export_records(now)))

    def export_records(self, now: float) -> Iterator[ClusterRecord]:
        """Plain copies of each cluster with affiliates, one cluster at a time.

        The caller may pause between clusters (the state may change meanwhile; every
        cluster is copied whole) and encode them anywhere: the copies share nothing
        mutable with the state.
        """
        for cluster in list(self._clusters.values()):
            if not cluster.affiliates:
                continue
            yield (
                cluster.id,
                [
                    (
                        aff.id,
                        aff.data,
                        max(0, int(aff.expiration - now)),
                        [(ep.data, max(0, int(ep.expiration - now))) for ep in aff.endpoints],
                    )
                    for aff in cluster.affiliates.values()
                ],
            )

    def import_snapshot(self, blob: bytes, now: float, wall_now: float) -> int:
        """Load a snapshot into an empty state; entries that break a limit are skipped.

        Returns the number of affiliates restored. Raises ValueError if the blob is not
        a snapshot at all. ``wall_now`` (Unix time) serves old snapshots that stored
        absolute expirations instead of TTLs.
        """
        snap = spb.StateSnapshot()
        try:
            snap.ParseFromString(blob)
        except DecodeError as exc:
            raise ValueError(f"not a discovery state snapshot: {exc}") from exc

        def lifetime(entry: spb.AffiliateSnapshot | spb.EndpointSnapshot) -> float:
            if entry.HasField("ttl"):
                return entry.ttl.seconds + entry.ttl.nanos / 1e9
            return entry.expiration.seconds + entry.expiration.nanos / 1e9 - wall_now

        restored = 0
        for cs in snap.clusters:
            for a in cs.affiliates:
                endpoints = [(e.data, lifetime(e)) for e in a.endpoints]
                life = lifetime(a)
                try:
                    if life <= 0:
                        continue
                    self.update(cs.id, a.id, a.data, [], min(life, self.limits.ttl_max), now)
                    for data, ep_life in endpoints:
                        if ep_life > 0:
                            self.update(
                                cs.id, a.id, None, [data], min(ep_life, self.limits.ttl_max), now
                            )
                    restored += 1
                except LimitError:
                    continue
                # Endpoint updates may not extend the affiliate past its own lifetime.
                aff = self._clusters[cs.id].affiliates[a.id]
                aff.expiration = now + min(life, self.limits.ttl_max)
        return restored
