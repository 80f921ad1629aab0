"""The discovery service: gRPC ``sidero.discovery.server.Cluster`` over a Store.

Embeddable in a running asyncio loop: ``port = await server.start_async(host, port)``
and ``await server.stop_async()``. Everything that touches the store runs on that loop,
so no locks are needed. The store is the in-memory State (default) or Valkey shared
by several replicas (``store="redis://..."``, see valkey.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import grpc

from control.discovery import fanout, metrics
from control.discovery.health import Health
from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg
from control.discovery.proxyaddr import ProxyTrust
from control.discovery.ratelimit import ClientLimiter
from control.discovery.requestlog import log_request
from control.discovery.snapshotfile import AtomicWriter
from control.discovery.state import (
    AffiliateView,
    ClusterRecord,
    LimitError,
    Limits,
    State,
    encode_cluster_record,
)
from control.discovery.store import MemoryStore, Store, StoreUnavailable, Watcher
from control.discovery.tlsreload import ReloadingCredentials
from control.promhttp import MetricsServer
from kubespan_dp.netutil import format_endpoint

log = logging.getLogger("control.discovery.server")
SNAPSHOT_SLICE = 2000  # affiliates copied per loop turn when saving a snapshot
T = TypeVar("T")


@dataclass
class ServerOptions:
    redirect_endpoint: str = ""  # when set, Hello tells clients to go there
    disable_client_ip: bool = False
    # Networks of proxies whose X-Real-IP / X-Forwarded-For name the client (proxyaddr.py).
    trusted_proxies: list[str] = field(default_factory=list)
    gc_interval: float = 60.0
    # None: state in this process; redis://HOST:PORT/DB, rediss://, unix://PATH: Valkey.
    store: str | None = None
    store_cluster: bool = False  # ``store`` is a node of a Valkey Cluster
    store_check_interval: float = 5.0  # health: how often a shared store is pinged
    snapshot_path: str | None = None  # None: no persistence (in-memory store only)
    snapshot_interval: float = 600.0
    tls_cert_file: str | None = None  # both set: TLS; else plain h2c
    tls_key_file: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    rate: float = 15.0  # per client connection, requests per second (ratelimit.py)
    burst: int = 60
    ip_rate: float = 256.0  # per client address, all its connections together
    ip_burst: int = 4096
    rate_max_wait: float = 10.0  # longest a rate-limited request is held back
    limits: Limits = field(default_factory=Limits)
    max_message_bytes: int = 64 * 1024  # far above any valid request
    # HTTP/2 streams one connection may have open at once. A Talos node uses two (its
    # watch and one call); a proxy multiplexing clients opens more connections past it.
    # Streams a client opens before it has our settings are refused (UNAVAILABLE) past
    # the cap, so it stays well above what one client sends at once.
    max_streams_per_connection: int = 1024
    max_pending_calls: int = 16384  # received, not yet handled (see start_async)
    # All watch streams together (every replica's, on a shared store) send about this many
    # change messages a second (fanout.py).
    watch_messages_per_second: float = 2000.0
    shutdown_grace: float = 1.0  # running calls get this long to finish on stop
    log_requests: bool = False  # one JSON line per request (requestlog.py)


def _to_pb(view: AffiliateView) -> pb.Affiliate:
    return pb.Affiliate(id=view.id, data=view.data, endpoints=list(view.endpoints))


def _write_records(writer: AtomicWriter, records: list[ClusterRecord]) -> None:
    for record in records:
        writer.write(encode_cluster_record(record))


class _Malformed:
    """Stands in for a request body that did not deserialize, so the handler can refuse it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(body: bytes) -> Any:
        try:
            return message_type.FromString(body)
        except Exception as exc:  # DecodeError, or UTF-8 errors in string fields
            return _Malformed(exc)

    return parse


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refuse_malformed(request: Any) -> None:
    # Same status a Go gRPC server gives for a body it cannot unmarshal.
    if isinstance(request, _Malformed):
        raise _Abort(grpc.StatusCode.INTERNAL, f"error unmarshalling request: {request.error}")


def _limit_status(err: LimitError) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if err.exhausted else grpc.StatusCode.INVALID_ARGUMENT


class _ClusterService(pbg.ClusterServicer):
    def __init__(self, owner: DiscoveryServer) -> None:
        self._o = owner

    async def _unary(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        fn: Callable[[], Awaitable[T]],
    ) -> T:
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        try:
            _refuse_malformed(request)
            await self._o._admit(context)
            try:
                return await fn()
            except LimitError as err:
                raise _Abort(_limit_status(err), str(err)) from None
            except StoreUnavailable as err:
                await self._o._store_health(False)
                raise _Abort(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except _Abort as err:
            code = err.code
            await context.abort(err.code, str(err))
            raise  # not reached: abort raises
        finally:
            self._o._finished(method, request, context, code, started)

    async def Hello(
        self, request: pb.HelloRequest, context: grpc.aio.ServicerContext
    ) -> pb.HelloResponse:
        async def handle() -> pb.HelloResponse:
            self._o.requests.hello(request.client_version)
            self._o.store.check_cluster_id(request.cluster_id)
            resp = pb.HelloResponse()
            ip = None if self._o.options.disable_client_ip else self._o._client_ip(context)
            if ip is not None:
                resp.client_ip = ip_address(ip).packed
            if self._o.options.redirect_endpoint:
                resp.redirect.endpoint = self._o.options.redirect_endpoint
            return resp

        return await self._unary("Hello", request, context, handle)

    async def AffiliateUpdate(
        self, request: pb.AffiliateUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AffiliateUpdateResponse:
        async def handle() -> pb.AffiliateUpdateResponse:
            ttl = request.ttl.seconds + request.ttl.nanos / 1e9
            data = request.affiliate_data if request.HasField("affiliate_data") else None
            await self._o.store.update(
                request.cluster_id,
                request.affiliate_id,
                data,
                list(request.affiliate_endpoints),
                ttl,
            )
            return pb.AffiliateUpdateResponse()

        return await self._unary("AffiliateUpdate", request, context, handle)

    async def AffiliateDelete(
        self, request: pb.AffiliateDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.AffiliateDeleteResponse:
        async def handle() -> pb.AffiliateDeleteResponse:
            await self._o.store.delete(request.cluster_id, request.affiliate_id)
            return pb.AffiliateDeleteResponse()

        return await self._unary("AffiliateDelete", request, context, handle)

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        async def handle() -> pb.ListResponse:
            views = await self._o.store.list(request.cluster_id)
            return pb.ListResponse(affiliates=[_to_pb(v) for v in views])

        return await self._unary("List", request, context, handle)

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        code = grpc.StatusCode.OK
        started = time.perf_counter()
        wake = asyncio.Event()
        sub: Watcher | None = None
        try:
            _refuse_malformed(request)
            await self._o._admit(context)
            try:
                snapshot, sub = await self._o.store.subscribe(request.cluster_id, wake.set)
            except LimitError as err:
                raise _Abort(_limit_status(err), str(err)) from None
            except StoreUnavailable as err:
                await self._o._store_health(False)
                raise _Abort(grpc.StatusCode.UNAVAILABLE, str(err)) from None
            self._o._watch_wakers.add(wake.set)
            yield self._o.encoder.snapshot(snapshot)
            pace = fanout.Pace(self._o.options.watch_messages_per_second, self._o._watch_count)
            while not self._o._stopping:
                if sub.queue:
                    await pace.wait()  # let changes gather, within the service-wide budget
                # Everything queued since our last message, batched (fanout.py).
                for reply in self._o.encoder.changes(sub.queue):
                    yield reply
                if sub.overflowed:
                    raise _Abort(grpc.StatusCode.ABORTED, "subscription canceled: lost update")
                if sub.unavailable:
                    await self._o._store_health(False)
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, "store unavailable (watch)")
                wake.clear()
                if not (sub.queue or sub.overflowed or sub.unavailable or self._o._stopping):
                    await wake.wait()
        except _Abort as err:
            code = err.code
            await context.abort(err.code, str(err))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._o._watch_wakers.discard(wake.set)
            if sub is not None:
                sub.close()
            self._o._finished("Watch", request, context, code, started)


def _handlers(service: _ClusterService) -> grpc.GenericRpcHandler:
    """The Cluster service's method table, with request parsing that cannot raise."""

    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        "sidero.discovery.server.Cluster",
        {
            "Hello": unary(service.Hello, pb.HelloRequest, pb.HelloResponse),
            "AffiliateUpdate": unary(
                service.AffiliateUpdate, pb.AffiliateUpdateRequest, pb.AffiliateUpdateResponse
            ),
            "AffiliateDelete": unary(
                service.AffiliateDelete, pb.AffiliateDeleteRequest, pb.AffiliateDeleteResponse
            ),
            "List": unary(service.List, pb.ListRequest, pb.ListResponse),
            "Watch": grpc.unary_stream_rpc_method_handler(
                service.Watch,
                request_deserializer=_lenient(pb.WatchRequest),
                response_serializer=fanout.encode_watch_reply,
            ),
        },
    )


class DiscoveryServer:
    def __init__(
        self,
        options: ServerOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> None:
        opts = options or ServerOptions()
        for key, value in overrides.items():
            if not hasattr(opts, key):
                raise TypeError(f"unknown server option {key!r}")
            setattr(opts, key, value)
        self.options = opts
        self.clock = clock
        self.state = State(opts.limits)  # the in-memory store's (unused with Valkey)
        self.store: Store
        if opts.store:
            if opts.snapshot_path:
                raise ValueError("snapshots are for the in-memory store; Valkey persists itself")
            from control.discovery.valkey import ValkeyStore  # redis only when asked for

            self.store = ValkeyStore(
                opts.store, opts.limits, cluster=opts.store_cluster, gc_interval=opts.gc_interval
            )
        else:
            self.store = MemoryStore(self.state, clock)
        self.health = Health()
        self._serving = True  # as set_serving last asked
        self._store_ok = True  # the store answered the last call or check
        self.tls: ReloadingCredentials | None = None
        self.proxies = ProxyTrust(opts.trusted_proxies)
        self.limiter = ClientLimiter(opts.rate, opts.burst, opts.ip_rate, opts.ip_burst)
        self.encoder = fanout.WatchEncoder()
        self.requests = metrics.RequestCounters()
        self.snapshots = metrics.SnapshotStats()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._watch_wakers: set[Callable[[], None]] = set()

    def _finished(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        started: float,
    ) -> None:
        seconds = time.perf_counter() - started
        self.requests.record(method, code.name, seconds)
        if self.options.log_requests:
            log_request(method, code.name, seconds, self._client_ip(context), request)

    def _watch_count(self) -> int:
        # Replicas of a shared store count each other's too: the budget is the service's.
        return len(self._watch_wakers) + self.store.other_watchers()

    # -- request admission ------------------------------------------------------------

    def _client_ip(self, context: grpc.aio.ServicerContext) -> str | None:
        return self.proxies.client(context.peer(), context.invocation_metadata()).ip

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        client = self.proxies.client(peer, context.invocation_metadata())
        if client.ip is None:
            return  # a unix socket: only local processes can reach it
        # A proxy's connection carries many clients: key on the one it names too.
        connection = f"{client.ip} via {peer}" if client.forwarded else peer
        address = None if client.via_trusted_proxy and not client.forwarded else client.ip
        remaining = context.time_remaining()
        budget = (
            self.options.rate_max_wait
            if remaining is None
            else min(remaining, self.options.rate_max_wait)
        )
        wait = self.limiter.reserve(connection, address, self.clock(), budget)
        if wait is None:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeds request timeout")
        if wait > 0:
            await asyncio.sleep(wait)

    async def set_serving(self, serving: bool) -> None:
        """What the health service reports (a hook for what the service depends on);
        NOT_SERVING regardless while the store cannot be reached."""
        self._serving = serving
        await self.health.set_serving(self._serving and self._store_ok)

    async def _store_health(self, ok: bool) -> None:
        """A store call failed (or a check answered): health follows it on a change."""
        if ok == self._store_ok:
            return
        self._store_ok = ok
        log.warning("store %s: %s", "reachable again" if ok else "unreachable", self.options.store)
        await self.health.set_serving(self._serving and ok)

    # -- lifecycle (inside a loop) ----------------------------------------------------

    async def start_async(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._restore()
        await self.store.start()
        o = self.options
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", o.max_message_bytes),
                # Talos clients ping every max(10 s, TTL/10); do not punish that.
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_concurrent_streams", o.max_streams_per_connection),
                # Calls that arrived but no handler has taken yet. Past the soft limit gRPC
                # starts cancelling new calls at random (1,000 by default: a restart's herd
                # of one 1,024-node cluster sends 3,072 at once).
                ("grpc.server.max_pending_requests", o.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", 2 * o.max_pending_calls),
            ]
        )
        server.add_generic_rpc_handlers((_handlers(_ClusterService(self)),))
        self.health.add_to(server)
        address = format_endpoint((host, port))
        if o.tls_cert_file and o.tls_key_file:
            # Reloaded when the files change (a renewed certificate; tlsreload.py).
            self.tls = ReloadingCredentials(o.tls_cert_file, o.tls_key_file)
            bound = server.add_secure_port(address, self.tls.credentials)
        elif o.tls_cert_file or o.tls_key_file:
            raise ValueError("TLS needs both a certificate and a key file")
        else:
            bound = server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server, self.port = server, bound
        await self.set_serving(True)
        if o.metrics_port is not None:
            self._metrics_server = MetricsServer(
                lambda: metrics.families(
                    self.store, self.requests, None if o.store else self.snapshots
                )
            )
            self.metrics_port = await self._metrics_server.start(o.metrics_host, o.metrics_port)
        self._tasks = [asyncio.create_task(self._gc_loop())]
        if o.store:
            self._tasks.append(asyncio.create_task(self._store_check_loop()))
        if o.snapshot_path:
            self._tasks.append(asyncio.create_task(self._snapshot_loop()))
        log.info(
            "discovery service listening on %s (tls=%s)",
            address.replace(f":{port}", f":{bound}"),
            bool(o.tls_cert_file),
        )
        return bound

    async def stop_async(self) -> None:
        if self._server is None:
            return
        self._stopping = True
        await self.health.shutdown()  # NOT_SERVING while running calls drain
        for wake in list(self._watch_wakers):
            wake()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        await self._server.stop(self.options.shutdown_grace)
        self._server = None
        await self.store.close()
        if self.options.snapshot_path:
            await self.save_snapshot()

    # -- housekeeping -----------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.gc_interval)
            try:
                self.limiter.gc(self.clock())
                clusters, affiliates = await self.store.gc()
                if clusters or affiliates:
                    log.info("gc removed %d clusters, %d affiliates", clusters, affiliates)
            except StoreUnavailable as exc:
                log.warning("garbage collection skipped: %s", exc)
                await self._store_health(False)
            except Exception:  # housekeeping must outlive any single failure
                log.exception("garbage collection failed")

    async def _store_check_loop(self) -> None:
        """A shared store is checked now and then: once it answers again, health says
        SERVING again (a load balancer that stopped sending clients brings no calls)."""
        while True:
            try:
                await self.store.ping()
                ok = True
            except StoreUnavailable:
                ok = False
            except Exception:  # housekeeping must outlive any single failure
                log.exception("store check failed")
                ok = False
            await self._store_health(ok)
            await asyncio.sleep(self.options.store_check_interval)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.snapshot_interval)
            try:
                await self.save_snapshot()
            except Exception:
                log.exception("writing the state snapshot failed")

    async def save_snapshot(self) -> None:
        """Write the state to the snapshot file without holding the loop.

        The loop only copies (plain tuples sharing the bytes), a few thousand affiliates at
        a time; a thread encodes and writes each slice while the loop goes on (100k
        affiliates would hold the loop ~0.4-1.7 s if encoded in one go).
        """
        path = Path(self.options.snapshot_path or "")
        started = time.perf_counter()
        try:
            writer = await asyncio.to_thread(AtomicWriter, path)
        except BaseException:
            self.snapshots.failed += 1
            raise
        try:
            clusters = 0
            batch: list[ClusterRecord] = []
            size = 0
            for record in self.state.export_records(self.clock()):
                batch.append(record)
                size += len(record[1])
                if size >= SNAPSHOT_SLICE:
                    await asyncio.to_thread(_write_records, writer, batch)
                    clusters += len(batch)
                    batch, size = [], 0
            await asyncio.to_thread(_write_records, writer, batch)
            await asyncio.to_thread(writer.commit)
        except BaseException:
            self.snapshots.failed += 1
            await asyncio.to_thread(writer.abort)
            raise
        stats = self.snapshots
        stats.written += 1
        stats.last_seconds = time.perf_counter() - started
        stats.last_bytes = writer.size
        stats.last_success = time.time()
        log.debug("state snapshot written to %s (%d clusters)", path, clusters + len(batch))

    def _restore(self) -> None:
        if not self.options.snapshot_path:
            return
        path = Path(self.options.snapshot_path)
        if not path.exists():
            return
        try:
            n = self.state.import_snapshot(path.read_bytes(), self.clock(), time.time())
        except ValueError as exc:
            # Keep the unreadable file for inspection instead of overwriting it later.
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.error(
                "state snapshot %s unreadable (%s); moved to %s, starting empty", path, exc, aside
            )
            return
        log.info("restored %d affiliates from %s", n, path)
