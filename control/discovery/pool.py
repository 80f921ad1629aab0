"""Several discovery services at once: one client per service, their affiliates merged.

As Talos's DiscoveryServiceController: every configured service gets its own client,
all of them publish the same local data, and what they report is merged by affiliate
id. A node therefore stays known while any one of the services that carry it is up;
a service that is down keeps its last view (the client reconnects with backoff) and
the others keep theirs.

The merge follows Talos's ``AffiliateSpec.Merge``: lists (addresses, KubeSpan
networks, endpoints) are united in first-seen order, scalars (hostname, nodename,
machine type, key, address, API server port) are taken from the later service when it
has them. Services are merged in configuration order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc

from control.affiliate import Affiliate, KubeSpanInfo
from control.discovery.client import DiscoveryClient
from kubespan_dp.netutil import Address, IPAddress

log = logging.getLogger("control.discovery.pool")

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceTarget:
    """One discovery service as a client connects to it."""

    name: str
    endpoint: str  # gRPC target host:port, or a URL
    insecure: bool


def _union(first: tuple[T, ...], second: tuple[T, ...]) -> tuple[T, ...]:
    return tuple(dict.fromkeys((*first, *second)))


def _merge_kubespan(base: KubeSpanInfo | None, other: KubeSpanInfo | None) -> KubeSpanInfo | None:
    if base is None or other is None:
        return base or other
    return KubeSpanInfo(
        public_key=other.public_key or base.public_key,
        address=other.address if int(other.address) else base.address,
        additional_addresses=_union(base.additional_addresses, other.additional_addresses),
        endpoints=_union(base.endpoints, other.endpoints),
        exclude_advertised_networks=_union(
            base.exclude_advertised_networks, other.exclude_advertised_networks
        ),
    )


def merge_affiliate(base: Affiliate, other: Affiliate) -> Affiliate:
    """``base`` updated with what ``other`` knows about the same node."""
    return replace(
        base,
        hostname=other.hostname or base.hostname,
        nodename=other.nodename or base.nodename,
        machine_type=other.machine_type or base.machine_type,
        operating_system=other.operating_system or base.operating_system,
        addresses=_union(base.addresses, other.addresses),
        kubespan=_merge_kubespan(base.kubespan, other.kubespan),
        control_plane_api_port=(
            other.control_plane_api_port
            if other.control_plane_api_port is not None
            else base.control_plane_api_port
        ),
        extra={**base.extra, **other.extra},
    )


def merge_affiliates(tables: Iterable[Mapping[str, Affiliate]]) -> dict[str, Affiliate]:
    """One table out of each service's (in order): every id any of them reports."""
    merged: dict[str, Affiliate] = {}
    for table in tables:
        for aid, affiliate in table.items():
            known = merged.get(aid)
            merged[aid] = affiliate if known is None else merge_affiliate(known, affiliate)
    return merged


class DiscoveryPool:
    """The running clients, one per service, keyed by service name."""

    def __init__(
        self,
        cluster_id: str,
        secret: str | bytes,
        affiliate_id: str,
        *,
        on_change: Callable[[], None] | None = None,
        client_factory: Callable[..., DiscoveryClient] = DiscoveryClient,
    ) -> None:
        self.cluster_id = cluster_id
        self.affiliate_id = affiliate_id
        self._secret = secret
        self._on_change = on_change
        self._client_factory = client_factory  # DiscoveryClient's signature (tests tune it)
        self.clients: dict[str, tuple[ServiceTarget, DiscoveryClient]] = {}
        self._local: tuple[Affiliate, dict[str, Sequence[Address]]] | None = None

    def _new_client(self, service: ServiceTarget) -> DiscoveryClient:
        return self._client_factory(
            service.endpoint,
            self.cluster_id,
            self._secret,
            self.affiliate_id,
            insecure=service.insecure,
            on_change=lambda _affiliates: self._changed(),
        )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def configure(self, services: Sequence[ServiceTarget]) -> None:
        """Run exactly one client per service: stop the ones no longer wanted (or whose
        endpoint changed), start the new ones. Stopping never deletes our affiliate: it
        expires on that service by its TTL."""
        wanted = {s.name: s for s in services}
        for name, (service, client) in list(self.clients.items()):
            if wanted.get(name) != service:
                log.info("stopping discovery client %s (%s)", name, service.endpoint)
                del self.clients[name]
                await client.close(leave=False)
        for name, service in wanted.items():
            if name in self.clients:
                continue
            log.info("starting discovery client %s (%s)", name, service.endpoint)
            client = self._new_client(service)
            if self._local is not None:
                client.set_local(*self._local)
            client.start()
            self.clients[name] = (service, client)
        # Keep the configured order: it is the merge order.
        self.clients = {n: self.clients[n] for n in wanted}
        self._changed()

    def set_local(
        self, affiliate: Affiliate, other_endpoints: Mapping[str, Sequence[Address]] | None = None
    ) -> None:
        """Publish the same local data on every service."""
        self._local = (affiliate, dict(other_endpoints or {}))
        for _, client in self.clients.values():
            client.set_local(*self._local)

    @property
    def affiliates(self) -> dict[str, Affiliate]:
        return merge_affiliates(client.affiliates for _, client in self.clients.values())

    @property
    def own_endpoints(self) -> tuple[Address, ...]:
        """Our endpoints as the services have them (ours and those peers harvested)."""
        merged: dict[Address, None] = {}
        for _, client in self.clients.values():
            merged.update(dict.fromkeys(client.own_endpoints))
        return tuple(merged)

    @property
    def public_ip(self) -> IPAddress | None:
        """The first public IP a service reported (they all see the same one)."""
        for _, client in self.clients.values():
            if client.public_ip is not None:
                return client.public_ip
        return None

    async def close(self, leave: bool = False) -> dict[str, str | None]:
        """Stop every client. Our affiliate stays registered until its TTL runs out,
        unless ``leave``: then it is deleted from every service once the clients are
        stopped (so none can publish it again); see ``delete_affiliate``."""
        services = [service for service, _ in self.clients.values()]
        clients = [client for _, client in self.clients.values()]
        self.clients = {}
        await asyncio.gather(*(c.close(leave=False) for c in clients))
        if not leave:
            return {}
        return await delete_affiliate(services, self.cluster_id, self._secret, self.affiliate_id)


async def delete_affiliate(
    services: Sequence[ServiceTarget],
    cluster_id: str,
    secret: str | bytes,
    affiliate_id: str,
    timeout: float = 5.0,
) -> dict[str, str | None]:
    """Delete an affiliate from every service, all at once: service name -> None when
    it is gone there, else why not (each service is tried whatever the others say)."""

    async def one(service: ServiceTarget) -> str | None:
        client = DiscoveryClient(
            service.endpoint, cluster_id, secret, affiliate_id, insecure=service.insecure
        )
        try:
            await client.delete_local(timeout)
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        return None

    results = await asyncio.gather(*(one(s) for s in services))
    return {s.name: r for s, r in zip(services, results, strict=True)}
