"""Discovery client: publish the local affiliate, follow everyone else's.

Behaves like Talos's discovery client (siderolabs/discovery-client):
- connect, Hello (learn our public IP, follow a redirect), open Watch, then publish;
- publish again every TTL/2 and at once when the local data changes;
- on any failure drop the session and retry after an exponential backoff with jitter;
- the first Watch reply is a snapshot and replaces what we knew; later replies are
  single changes; our own affiliate is skipped (only its endpoints are kept, in
  ``own_endpoints``: peers harvest ours there); an affiliate that does not decrypt or
  decode is logged once and left out;
- closing keeps our affiliate (it expires by its TTL); deleting it is explicit
  (``delete_local()``, or ``close(leave=True)``).

asyncio API: ``start()`` / ``close()``, the current set in ``affiliates``, changes via
``on_change`` callback or ``async for snapshot in client.updates()``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from ipaddress import ip_address

import grpc

from control.affiliate import Affiliate
from control.discovery.cipher import AffiliateCipher, CipherError, secret_key
from control.discovery.codec import (
    CodecError,
    decode_affiliate,
    decode_endpoint,
    encode_affiliate,
    encode_endpoint,
)
from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg
from control.discovery.target import parse_discovery_endpoint
from kubespan_dp.netutil import Address, IPAddress

log = logging.getLogger("control.discovery.client")

DEFAULT_TTL = 30 * 60.0
CLIENT_VERSION = "kubespan-py/0.1.0"
MAX_REDIRECTS = 5  # in a row, before we treat it as a failure and back off


class Backoff:
    """Exponential backoff with jitter (the shape of cenkalti/backoff's defaults)."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 60.0,
        multiplier: float = 1.5,
        jitter: float = 0.5,
    ) -> None:
        self.initial, self.maximum, self.multiplier, self.jitter = (
            initial,
            maximum,
            multiplier,
            jitter,
        )
        self._current = initial

    def next(self) -> float:
        base = self._current
        self._current = min(self._current * self.multiplier, self.maximum)
        return base * (1 + self.jitter * (2 * random.random() - 1))

    def reset(self) -> None:
        self._current = self.initial


class _SessionEnded(Exception):
    """The watch stream ended; reconnect."""


class DiscoveryClient:
    def __init__(
        self,
        endpoint: str,
        cluster_id: str,
        secret: str | bytes,
        affiliate_id: str,
        *,
        insecure: bool | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        ttl: float = DEFAULT_TTL,
        client_version: str = CLIENT_VERSION,
        on_change: Callable[[dict[str, Affiliate]], None] | None = None,
        backoff: Backoff | None = None,
        rpc_timeout: float = 30.0,
        reconnect_grace: float = 60.0,
    ) -> None:
        self._target, self._tls = parse_discovery_endpoint(endpoint, insecure)
        self._insecure = insecure
        self.cluster_id = cluster_id
        self.affiliate_id = affiliate_id
        self._cipher = AffiliateCipher(secret_key(secret))
        self._root_certificates = root_certificates
        self._tls_server_name = tls_server_name
        self.ttl = ttl
        self.client_version = client_version
        self.on_change = on_change
        self._backoff = backoff or Backoff()
        self._rpc_timeout = rpc_timeout
        # After a reconnect, affiliates missing from the new snapshot are kept this long
        # (unless deleted explicitly): a service that restarted without its state must
        # not tear down working tunnels while the other nodes register again.
        self.reconnect_grace = reconnect_grace
        self._carried: dict[str, float] = {}  # affiliate id -> monotonic drop time
        self._had_snapshot = False

        self.public_ip: IPAddress | None = None
        self.affiliates: dict[str, Affiliate] = {}
        # Our own endpoints as the service has them: ours plus what peers harvested.
        self.own_endpoints: tuple[Address, ...] = ()
        self.connected = False  # a watch is open and our data is published
        self.failed_sessions = 0  # sessions that ended in an error (for tests and status)
        self.version = 0  # bumps on every change of ``affiliates``

        self._local: Affiliate | None = None
        self._local_sealed: tuple[bytes, list[bytes]] | None = None
        self._other_sealed: dict[str, list[bytes]] = {}
        self._others_plain: dict[str, tuple[Address, ...]] = {}
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        # Ids of affiliates whose data or an endpoint we could not read (warned once each).
        self.warned_about: set[str] = set()

    @property
    def endpoint(self) -> str:
        """The gRPC target in use (changes when the service redirects us)."""
        return self._target

    # -- local data -------------------------------------------------------------------

    def set_local(
        self, affiliate: Affiliate, other_endpoints: Mapping[str, Sequence[Address]] | None = None
    ) -> None:
        """Publish ``affiliate`` (its KubeSpan endpoints included) and endpoints seen for others."""
        others = {k: tuple(v) for k, v in (other_endpoints or {}).items() if v}
        if affiliate == self._local and others == self._others_plain:
            return
        endpoints = affiliate.kubespan.endpoints if affiliate.kubespan else ()
        data = self._cipher.seal_data(encode_affiliate(affiliate))
        self._local_sealed = (
            data,
            [self._cipher.seal_endpoint(encode_endpoint(e)) for e in endpoints],
        )
        self._other_sealed = {
            aid: [self._cipher.seal_endpoint(encode_endpoint(e)) for e in eps]
            for aid, eps in others.items()
        }
        self._others_plain = others
        self._local = affiliate
        self._kick.set()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self.run(), name=f"discovery-client-{self.affiliate_id}"
            )
        return self._task

    async def close(self, leave: bool = False) -> None:
        """Stop. Our affiliate stays on the service until its TTL runs out (a restart
        must not drop the node from its peers); with ``leave``, delete it first (best
        effort), as Talos does only when a machine is reset."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.connected = False
        if leave and self._local is not None:
            try:
                await self.delete_local()
            except grpc.aio.AioRpcError as err:
                log.warning("could not delete our affiliate on leave: %s", err.code().name)

    async def delete_local(self, timeout: float | None = None) -> None:
        """Delete our affiliate from the service now (raises grpc.aio.AioRpcError).

        Works without ``start()``: ``kubespan leave`` uses it with the node's id alone."""
        async with self._channel() as channel:
            await pbg.ClusterStub(channel).AffiliateDelete(
                pb.AffiliateDeleteRequest(
                    cluster_id=self.cluster_id, affiliate_id=self.affiliate_id
                ),
                timeout=timeout if timeout is not None else min(5.0, self._rpc_timeout),
            )

    async def run(self) -> None:
        """Keep a session with the service until cancelled."""
        redirects = 0
        while True:
            try:
                redirected = await self._session()
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, _SessionEnded, OSError) as err:
                detail = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)
                log.warning("discovery session with %s failed: %s", self._target, detail)
                self.failed_sessions += 1
                redirected = False
            self.connected = False
            if redirected and redirects < MAX_REDIRECTS:
                redirects += 1
                continue
            redirects = 0
            await asyncio.sleep(self._backoff.next())

    # -- observing --------------------------------------------------------------------

    async def updates(self) -> AsyncIterator[dict[str, Affiliate]]:
        """Yield the current affiliate set now and after each change (coalesced if slow)."""
        seen = -1
        while True:
            seen = await self._version_after(seen)
            yield dict(self.affiliates)

    async def _version_after(self, seen: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
            return self.version

    async def wait_for(
        self, predicate: Callable[[dict[str, Affiliate]], bool], timeout: float
    ) -> dict[str, Affiliate]:
        async def waiter() -> dict[str, Affiliate]:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.affiliates))
                return dict(self.affiliates)

        return await asyncio.wait_for(waiter(), timeout)

    # -- session ----------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, str | int]] = [
            ("grpc.keepalive_time_ms", int(max(10.0, self.ttl / 10) * 1000))
        ]
        if not self._tls:
            return grpc.aio.insecure_channel(self._target, options=options)
        if self._tls_server_name:
            options.append(("grpc.ssl_target_name_override", self._tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
        return grpc.aio.secure_channel(self._target, creds, options=options)

    async def _session(self) -> bool:
        """One connection's life. Returns True if the service redirected us elsewhere."""
        async with self._channel() as channel:
            stub = pbg.ClusterStub(channel)
            hello = await stub.Hello(
                pb.HelloRequest(cluster_id=self.cluster_id, client_version=self.client_version),
                timeout=min(10.0, self._rpc_timeout),
            )
            self.public_ip = (
                ip_address(hello.client_ip) if len(hello.client_ip) in (4, 16) else None
            )
            if hello.HasField("redirect") and hello.redirect.endpoint:
                target, tls = parse_discovery_endpoint(hello.redirect.endpoint, self._insecure)
                log.info("discovery service redirects us to %s", target)
                self._target = target
                if "://" in hello.redirect.endpoint:
                    self._tls = tls
                return True

            call = stub.Watch(pb.WatchRequest(cluster_id=self.cluster_id))
            reader = asyncio.create_task(self._read_watch(call))
            try:
                # Cleared before each publish, never after: a change made while a publish
                # is in flight sets it again and is published next.
                self._kick.clear()
                await self._publish(stub)
                self.connected = True
                self._backoff.reset()
                while True:
                    kick = asyncio.create_task(self._kick.wait())
                    done, _ = await asyncio.wait(
                        {kick, reader}, timeout=self.ttl / 2, return_when=asyncio.FIRST_COMPLETED
                    )
                    kick.cancel()
                    if reader in done:
                        reader.result()  # raises why the stream ended
                        raise _SessionEnded("watch stream ended")
                    self._kick.clear()
                    await self._publish(stub)
            finally:
                reader.cancel()
                call.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _publish(self, stub: pbg.ClusterStub) -> None:
        timeout = self._rpc_timeout
        if self._local_sealed is None:
            return  # nothing to publish yet
        data, endpoints = self._local_sealed
        req = pb.AffiliateUpdateRequest(
            cluster_id=self.cluster_id,
            affiliate_id=self.affiliate_id,
            affiliate_data=data,
            affiliate_endpoints=endpoints,
        )
        req.ttl.FromNanoseconds(int(self.ttl * 1e9))
        await stub.AffiliateUpdate(req, timeout=timeout)
        for aid, eps in list(self._other_sealed.items()):
            other = pb.AffiliateUpdateRequest(
                cluster_id=self.cluster_id, affiliate_id=aid, affiliate_endpoints=eps
            )
            other.ttl.FromNanoseconds(int(self.ttl * 1e9))
            await stub.AffiliateUpdate(other, timeout=timeout)

    async def _read_watch(self, call: grpc.aio.UnaryStreamCall) -> None:
        first = True
        async for reply in call:
            await self._apply(reply, snapshot=first)
            first = False

    # -- decoding ---------------------------------------------------------------------

    def _open(self, raw: pb.Affiliate) -> Affiliate:
        plain = decode_affiliate(self._cipher.open_data(raw.data))
        if plain.kubespan is not None:
            plain = replace(plain, kubespan=replace(plain.kubespan, endpoints=self._endpoints(raw)))
        return plain

    def _endpoints(self, raw: pb.Affiliate) -> tuple[Address, ...]:
        endpoints: list[Address] = []
        for sealed in raw.endpoints:
            try:
                endpoints.append(decode_endpoint(self._cipher.open_endpoint(sealed)))
            except (CipherError, CodecError) as err:
                self._warn(raw.id, f"endpoint skipped: {err}")
        return tuple(dict.fromkeys(endpoints))

    def _warn(self, affiliate_id: str, message: str) -> None:
        # Once per affiliate: a cluster of strangers must not flood the log.
        if affiliate_id in self.warned_about:
            log.debug("affiliate %r: %s", affiliate_id, message)
            return
        if len(self.warned_about) > 4096:
            self.warned_about.clear()
        self.warned_about.add(affiliate_id)
        log.warning("affiliate %r: %s", affiliate_id, message)

    async def _apply(self, reply: pb.WatchResponse, snapshot: bool) -> None:
        table = {} if snapshot else dict(self.affiliates)
        if snapshot and self._had_snapshot and self.reconnect_grace > 0:
            drop_at = asyncio.get_running_loop().time() + self.reconnect_grace
            listed = {raw.id for raw in reply.affiliates}
            for aid, affiliate in self.affiliates.items():
                if aid not in listed:
                    table[aid] = affiliate
                    self._carried.setdefault(aid, drop_at)
            if self._carried:
                asyncio.get_running_loop().call_later(self.reconnect_grace, self._schedule_prune)
        self._had_snapshot = self._had_snapshot or snapshot
        own = self.own_endpoints
        for raw in reply.affiliates:
            if raw.id == self.affiliate_id:
                own = () if reply.deleted else self._endpoints(raw)
                continue
            self._carried.pop(raw.id, None)  # heard of again (or deleted): no longer carried over
            if reply.deleted or not raw.data:
                table.pop(raw.id, None)
                continue
            try:
                table[raw.id] = self._open(raw)
            except (CipherError, CodecError) as err:
                table.pop(raw.id, None)
                self._warn(raw.id, f"left out: {err}")
        own_changed = own != self.own_endpoints
        self.own_endpoints = own
        await self._replace(table, force=snapshot or own_changed)

    def _schedule_prune(self) -> None:
        asyncio.ensure_future(self._prune_carried())

    async def _prune_carried(self) -> None:
        """Drop carried-over affiliates whose grace ran out without news of them."""
        now = asyncio.get_running_loop().time()
        expired = [aid for aid, deadline in self._carried.items() if deadline <= now]
        if not expired:
            return
        for aid in expired:
            del self._carried[aid]
        log.info(
            "dropping %d affiliate(s) the restarted discovery service no longer knows", len(expired)
        )
        await self._replace(
            {k: v for k, v in self.affiliates.items() if k not in expired}, force=False
        )

    async def _replace(self, table: dict[str, Affiliate], force: bool) -> None:
        if force or table != self.affiliates:
            async with self._changed:
                self.affiliates = table
                self.version += 1
                self._changed.notify_all()
            if self.on_change is not None:
                try:
                    self.on_change(dict(table))
                except Exception:
                    log.exception("discovery on_change callback failed")
