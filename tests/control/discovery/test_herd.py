"""A restart's herd, a cluster behind one NAT, and an abusive client: the rate limits and
the batched fan-out, with real clients (one gRPC connection each) against a real service."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg

from .conftest import Raw, run, target
from .services import Factory, service_factory

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def make_service() -> Iterator[Factory]:
    yield from service_factory()


async def _node(addr: str, cluster: str, aid: str, n: int, done: asyncio.Event, seen: dict) -> None:
    """Hello, Watch, AffiliateUpdate on its own connection, as Talos does; then read the
    watch until it holds all ``n`` affiliates. Any failed RPC fails the test."""
    # A private subchannel pool: its own TCP connection (its own source port), like a node.
    async with grpc.aio.insecure_channel(
        addr, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        stub = pbg.ClusterStub(ch)
        await stub.Hello(pb.HelloRequest(cluster_id=cluster), timeout=10)
        call = stub.Watch(pb.WatchRequest(cluster_id=cluster))
        req = pb.AffiliateUpdateRequest(
            cluster_id=cluster,
            affiliate_id=aid,
            affiliate_data=aid.encode() * 20,
            affiliate_endpoints=[aid.encode()[:16]],
        )
        req.ttl.seconds = 600
        await stub.AffiliateUpdate(req, timeout=30)
        known: set[str] = set()
        async for reply in call:
            for aff in reply.affiliates:
                (known.discard if reply.deleted else known.add)(aff.id)
            if len(known) == n:
                seen[aid] = known
                break
        call.cancel()
        await done.wait()  # stay connected until everyone has converged


def test_herd_of_256_behind_one_address_converges_with_default_limits(make_service):
    server = make_service()  # the default rate limits; every client is 127.0.0.1
    n = 256

    async def main() -> None:
        done = asyncio.Event()
        seen: dict[str, set[str]] = {}
        nodes = [
            asyncio.create_task(_node(target(server), "herd", f"n{i}", n, done, seen))
            for i in range(n)
        ]
        while len(seen) < n:
            finished = [t for t in nodes if t.done()]
            for t in finished:
                t.result()  # a failed RPC ends the test with its error
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*nodes)
        assert all(len(s) == n for s in seen.values())

    run(main(), timeout=120)
    codes = server.call(lambda: dict(server.requests.handled))
    assert {code for _, code in codes} == {"OK", "CANCELLED"}  # cancelled: our watch reads
    assert codes[("Hello", "OK")] == codes[("AffiliateUpdate", "OK")] == n


def test_one_abusive_connection_is_throttled_at_the_reference_pace(make_service):
    server = make_service()  # 15 requests/s, burst 60 per connection

    async def main() -> None:
        async with Raw(server) as raw:
            for _ in range(60):
                await raw.stub.Hello(pb.HelloRequest(cluster_id="c"), timeout=5)
            # Burst spent: the next token is 1/15 s away, beyond a 20 ms deadline. (On a
            # loaded machine the burst may take longer than that and tokens come back: go
            # on asking, faster than 15/s, until one is refused.)
            codes = []
            for _ in range(200):
                try:
                    await raw.stub.Hello(pb.HelloRequest(cluster_id="c"), timeout=0.02)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
                    if err.code() == EXHAUSTED:
                        break
            assert EXHAUSTED in codes, codes
            # Another connection from the same address is a separate client.
            async with grpc.aio.insecure_channel(
                target(server), options=[("grpc.use_local_subchannel_pool", 1)]
            ) as other:
                await pbg.ClusterStub(other).Hello(pb.HelloRequest(cluster_id="c"), timeout=0.5)

    run(main())


def test_many_connections_from_one_address_share_its_budget(make_service):
    server = make_service(ip_rate=0.5, ip_burst=8)

    async def main() -> None:
        channels = [
            grpc.aio.insecure_channel(
                target(server), options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(9)
        ]
        try:
            stubs = [pbg.ClusterStub(ch) for ch in channels]
            for stub in stubs[:8]:  # one request each: the address's burst
                await stub.Hello(pb.HelloRequest(cluster_id="c"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stubs[8].Hello(pb.HelloRequest(cluster_id="c"), timeout=0.5)
            assert info.value.code() == EXHAUSTED
        finally:
            for ch in channels:
                await ch.close()

    run(main())


def test_watchers_get_changes_batched_not_one_message_each(make_service):
    # A budget of 40 messages/s for 20 watchers: each sends at most ~2 a second.
    server = make_service(rate=1e6, burst=10**6, watch_messages_per_second=40)
    n_watchers, n_updates = 20, 400

    async def main() -> None:
        async with Raw(server) as raw:
            calls = [raw.stub.Watch(pb.WatchRequest(cluster_id="b")) for _ in range(n_watchers)]
            for call in calls:
                assert list((await call.read()).affiliates) == []  # the (empty) snapshot

            async def read_all(call) -> tuple[int, dict[str, bytes]]:
                messages, seen = 0, dict[str, bytes]()
                while len(seen) < 100 or any(v != b"last" for v in seen.values()):
                    reply = await call.read()
                    messages += 1
                    for aff in reply.affiliates:
                        seen[aff.id] = aff.data
                return messages, seen

            readers = [asyncio.create_task(read_all(c)) for c in calls]
            # 400 updates of 100 affiliates, the last one of each marked.
            for i in range(n_updates):
                data = b"last" if i >= n_updates - 100 else str(i).encode()
                await raw.update("b", f"n{i % 100}", data=data)
            results = await asyncio.gather(*readers)
            for messages, seen in results:
                assert len(seen) == 100 and set(seen.values()) == {b"last"}
                assert messages <= 40, f"{messages} messages for {n_updates} changes"
            for call in calls:
                call.cancel()

    run(main(), timeout=120)
