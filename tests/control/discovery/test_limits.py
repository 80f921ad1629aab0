"""Every limit and malformed request: the right gRPC status, and the state left as it was."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

import grpc
import pytest

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg
from control.discovery.proxyaddr import peer_ip

from .conftest import Raw, run, target

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LONG = "x" * 257


def _update(
    cluster="c", aid="a", data=b"d", endpoints=(), ttl_s=60, ttl_ns=0
) -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(
        cluster_id=cluster, affiliate_id=aid, affiliate_endpoints=list(endpoints)
    )
    if data is not None:
        req.affiliate_data = data
    req.ttl.seconds, req.ttl.nanos = ttl_s, ttl_ns
    return req


BAD_REQUESTS = {
    "hello-empty-cluster": ("Hello", pb.HelloRequest(cluster_id=""), INVALID),
    "hello-long-cluster": ("Hello", pb.HelloRequest(cluster_id=LONG), INVALID),
    "update-empty-cluster": ("AffiliateUpdate", _update(cluster=""), INVALID),
    "update-long-cluster": ("AffiliateUpdate", _update(cluster=LONG), INVALID),
    "update-empty-affiliate": ("AffiliateUpdate", _update(aid=""), INVALID),
    "update-long-affiliate": ("AffiliateUpdate", _update(aid=LONG), INVALID),
    # 256 bytes, but counted in UTF-8 bytes, not characters:
    "update-long-affiliate-utf8": ("AffiliateUpdate", _update(aid="é" * 129), INVALID),
    "update-big-data": ("AffiliateUpdate", _update(data=b"d" * 2049), INVALID),
    "update-big-endpoint": ("AffiliateUpdate", _update(endpoints=[b"e" * 33]), INVALID),
    "update-ttl-too-long": ("AffiliateUpdate", _update(ttl_s=1800, ttl_ns=1), INVALID),
    "update-ttl-negative": ("AffiliateUpdate", _update(ttl_s=-5), INVALID),
    "update-65-endpoints": (
        "AffiliateUpdate",
        _update(endpoints=[bytes([i]) * 16 for i in range(65)]),
        EXHAUSTED,
    ),
    "delete-empty-cluster": (
        "AffiliateDelete",
        pb.AffiliateDeleteRequest(cluster_id="", affiliate_id="a"),
        INVALID,
    ),
    "delete-long-affiliate": (
        "AffiliateDelete",
        pb.AffiliateDeleteRequest(cluster_id="c", affiliate_id=LONG),
        INVALID,
    ),
    "list-empty-cluster": ("List", pb.ListRequest(cluster_id=""), INVALID),
    "list-long-cluster": ("List", pb.ListRequest(cluster_id=LONG), INVALID),
}


def _snapshot(server) -> object:
    """Everything the store holds, expiry times included."""
    return server.run(server.store.dump)


def _subscriptions(server) -> int:
    return server.run(server.store.stats).subscriptions


@pytest.fixture
def seeded(make_server):
    """A service with one affiliate holding one endpoint, and the state's fingerprint."""
    server = make_server(rate=1e6, burst=10**6)

    async def seed() -> None:
        async with Raw(server) as raw:
            await raw.update("c", "a", data=b"seed", endpoints=[b"E" * 16], ttl=600)

    run(seed())
    return server


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_status_and_state_unchanged(seeded, case):
    method, request, code = BAD_REQUESTS[case]
    before = _snapshot(seeded)

    async def main() -> None:
        async with Raw(seeded) as raw:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(raw.stub, method)(request, timeout=10)
            assert info.value.code() == code, info.value.details()
            assert await raw.list("c") == {"a": (b"seed", (b"E" * 16,))}

    run(main())
    assert _snapshot(seeded) == before


def test_watch_with_bad_cluster_id_is_invalid(seeded):
    async def main() -> None:
        async with Raw(seeded) as raw:
            for cid in ("", LONG):
                call = raw.stub.Watch(pb.WatchRequest(cluster_id=cid))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == INVALID

    run(main())
    assert _subscriptions(seeded) == 0


def test_values_at_the_limits_are_accepted(seeded):
    async def main() -> None:
        async with Raw(seeded) as raw:
            cid, aid = "c" * 256, "a" * 256
            await raw.stub.AffiliateUpdate(
                _update(
                    cluster=cid,
                    aid=aid,
                    data=b"d" * 2048,
                    endpoints=[bytes([i]) * 32 for i in range(64)],
                    ttl_s=1800,
                ),
                timeout=10,
            )
            listed = await raw.list(cid)
            assert len(listed[aid][1]) == 64 and len(listed[aid][0]) == 2048

    run(main())


def test_endpoint_overflow_of_existing_affiliate_changes_nothing(seeded):
    async def main() -> None:
        async with Raw(seeded) as raw:
            # 1 stored + 63 new = 64: fine; the same 63 again are merges, not additions.
            eps = [bytes([i + 1]) * 16 for i in range(63)]
            await raw.stub.AffiliateUpdate(
                _update(cluster="c2", aid="a", endpoints=[b"E" * 16]), timeout=10
            )
            await raw.stub.AffiliateUpdate(
                _update(cluster="c2", aid="a", endpoints=eps), timeout=10
            )
            await raw.stub.AffiliateUpdate(
                _update(cluster="c2", aid="a", endpoints=eps), timeout=10
            )
            # One more distinct endpoint overflows, and the new data in the same request is
            # refused too.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw.stub.AffiliateUpdate(
                    _update(cluster="c", aid="a", data=b"new", endpoints=eps + [b"Z" * 16]),
                    timeout=10,
                )
            assert info.value.code() == EXHAUSTED
            assert await raw.list("c") == {"a": (b"seed", (b"E" * 16,))}

    run(main())
    # Only cluster c2 appeared; cluster c is byte-identical.
    after = seeded.run(lambda: seeded.store.list("c"))
    assert [(v.id, v.data, v.endpoints) for v in after] == [("a", b"seed", (b"E" * 16,))]


def test_1025th_affiliate_is_refused(make_server):
    server = make_server(rate=1e6, burst=10**6)

    async def main() -> None:
        async with Raw(server) as raw:
            for start in range(0, 1024, 128):  # more at once can trip gRPC's overload cut-off
                await asyncio.gather(
                    *(raw.update("full", f"n{i}", data=b"x") for i in range(start, start + 128))
                )
            before = await raw.list("full")
            assert len(before) == 1024
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw.update("full", "one-too-many", data=b"x")
            assert info.value.code() == EXHAUSTED
            await raw.update("full", "n5", data=b"updated")  # existing ones still update
            after = await raw.list("full")
            assert "one-too-many" not in after and after["n5"][0] == b"updated"
            await raw.update("other", "n0", data=b"x")  # the limit is per cluster

    run(main())


def test_cluster_count_cap(make_server):
    from control.discovery.state import Limits

    server = make_server(limits=Limits(clusters_max=3), rate=1e6, burst=10**6)

    async def main() -> None:
        async with Raw(server) as raw:
            for i in range(3):
                await raw.update(f"c{i}", "a")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw.update("c3", "a")
            assert info.value.code() == EXHAUSTED
            assert await raw.list("c3") == {}

    run(main())


def _raw_call(server, method: str, payload: bytes) -> Coroutine[None, None, bytes]:
    async def main() -> bytes:
        async with grpc.aio.insecure_channel(target(server)) as ch:
            # no (de)serializers: raw bytes both ways
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                f"/sidero.discovery.server.Cluster/{method}"
            )
            return await call(payload, timeout=10)

    return main()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",  # truncated varint tag
        b"\x0a\x05ab",  # length-delimited field longer than the message
        b"\x0a\x02\xc3\x28",  # cluster_id that is not UTF-8
        b"\x2a\x03\x08\x01",  # ttl submessage truncated
    ],
)
def test_undecodable_request_is_rejected_and_service_survives(seeded, payload):
    before = _snapshot(seeded)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(_raw_call(seeded, "AffiliateUpdate", payload))
    # gRPC's own status for a body that does not deserialize (Go servers answer the same).
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert _snapshot(seeded) == before
    resp = run(_raw_call(seeded, "Hello", pb.HelloRequest(cluster_id="c").SerializeToString()))
    assert pb.HelloResponse.FromString(resp).client_ip == b"\x7f\x00\x00\x01"


def test_oversized_message_is_refused(seeded):
    before = _snapshot(seeded)
    big = _update(data=b"d" * 2000, endpoints=[b"e" * 32] * 3000).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(_raw_call(seeded, "AffiliateUpdate", big))
    assert info.value.code() == EXHAUSTED
    assert _snapshot(seeded) == before


def test_unknown_method_is_unimplemented(seeded):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(_raw_call(seeded, "Nope", b""))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_rate_limit_per_ip(make_server):
    server = make_server(rate=2.0, burst=5)

    async def main() -> None:
        async with Raw(server) as raw:
            for _ in range(5):  # the burst
                await raw.stub.Hello(pb.HelloRequest(cluster_id="c"), timeout=5)
            # Bucket empty: the next token is 0.5 s away, beyond a 0.2 s deadline -> refused now.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw.stub.AffiliateUpdate(_update(), timeout=0.2)
            assert info.value.code() == EXHAUSTED
            # Refused requests consume nothing: with a generous deadline the caller waits its turn.
            await raw.stub.AffiliateUpdate(_update(data=b"waited"), timeout=5)
            assert (await raw.list("c"))["a"][0] == b"waited"

    run(main())
    codes = server.call(lambda: dict(server.requests.handled))
    assert codes[("AffiliateUpdate", "RESOURCE_EXHAUSTED")] == 1


def test_hello_echoes_ip_and_redirect(make_server):
    server = make_server(redirect_endpoint="discovery.example:443")
    hidden = make_server(disable_client_ip=True)
    proxied = make_server(trusted_proxies=["127.0.0.0/8"])

    async def main() -> None:
        async with Raw(server) as raw:
            resp = await raw.stub.Hello(
                pb.HelloRequest(cluster_id="c", client_version="v1.9.0"), timeout=5
            )
            assert resp.client_ip == b"\x7f\x00\x00\x01"
            assert resp.HasField("redirect") and resp.redirect.endpoint == "discovery.example:443"
        async with Raw(hidden) as raw:
            resp = await raw.stub.Hello(pb.HelloRequest(cluster_id="c"), timeout=5)
            assert resp.client_ip == b"" and not resp.HasField("redirect")
        async with Raw(proxied) as raw:
            resp = await raw.stub.Hello(
                pb.HelloRequest(cluster_id="c"), metadata=(("x-real-ip", "2001:db8::7"),), timeout=5
            )
            assert resp.client_ip == bytes.fromhex("20010db8000000000000000000000007")
            resp = await raw.stub.Hello(
                pb.HelloRequest(cluster_id="c"), metadata=(("x-real-ip", "not-an-ip"),), timeout=5
            )
            assert resp.client_ip == b"\x7f\x00\x00\x01"

    run(main())


def test_peer_ip_parsing():
    assert peer_ip("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_ip("ipv6:[::1]:5000") == "::1"
    assert peer_ip("ipv6:%5B::ffff:192.0.2.1%5D:80") == "192.0.2.1"
    assert peer_ip("unix:/tmp/sock") is None
    assert peer_ip("ipv4:garbage:1") is None


def test_watch_snapshot_first_then_changes(seeded):
    async def main() -> None:
        async with Raw(seeded) as raw:
            call = raw.stub.Watch(pb.WatchRequest(cluster_id="c"))
            first = await call.read()
            assert [(a.id, a.data) for a in first.affiliates] == [
                ("a", b"seed")
            ] and not first.deleted
            empty = raw.stub.Watch(pb.WatchRequest(cluster_id="nobody"))
            assert list((await empty.read()).affiliates) == []  # a snapshot even when empty
            await raw.update("c", "b", data=b"bee")
            upd = await call.read()
            assert [(a.id, a.data) for a in upd.affiliates] == [("b", b"bee")] and not upd.deleted
            await raw.update("c", "b", data=b"bee")  # no change: no message
            await raw.stub.AffiliateDelete(
                pb.AffiliateDeleteRequest(cluster_id="c", affiliate_id="b"), timeout=5
            )
            gone = await call.read()
            assert (
                gone.deleted
                and [a.id for a in gone.affiliates] == ["b"]
                and gone.affiliates[0].data == b""
            )
            # Deleting what is not there is not an error and sends nothing.
            await raw.stub.AffiliateDelete(
                pb.AffiliateDeleteRequest(cluster_id="c", affiliate_id="zz"), timeout=5
            )
            call.cancel()
            empty.cancel()

    run(main())


def test_slow_watcher_overflows_and_is_aborted(make_server):
    server = make_server(rate=1e6, burst=10**6)

    async def main() -> None:
        async with Raw(server) as raw:
            # A separate channel, so the stalled stream's flow control does not block our writes.
            # No BDP probing: the receive window stays at 64 KiB instead of growing to megabytes.
            async with grpc.aio.insecure_channel(
                target(server), options=[("grpc.http2.bdp_probe", 0)]
            ) as slow_ch:
                slow = pbg.ClusterStub(slow_ch).Watch(pb.WatchRequest(cluster_id="o"))
                assert list((await slow.read()).affiliates) == []
                # Never read: transport windows fill, then the 32-deep queue, then overflow.
                for i in range(3000):
                    await raw.update("o", f"n{i % 50}", data=bytes([i % 251]) * 2000)
                    if _subscriptions(server) == 0:
                        break
                assert _subscriptions(server) == 0
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while True:
                        await slow.read()
                assert info.value.code() == grpc.StatusCode.ABORTED
            # The service is fine and the others' state intact.
            assert len(await raw.list("o")) == 50

    run(main(), timeout=120)


def test_watcher_count_cap(make_server):
    from control.discovery.state import Limits

    server = make_server(limits=Limits(subscriptions_max=2))

    async def main() -> None:
        async with Raw(server) as raw:
            w1 = raw.stub.Watch(pb.WatchRequest(cluster_id="c"))
            w2 = raw.stub.Watch(pb.WatchRequest(cluster_id="d"))
            await w1.read()
            await w2.read()
            w3 = raw.stub.Watch(pb.WatchRequest(cluster_id="c"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await w3.read()
            assert info.value.code() == EXHAUSTED
            w1.cancel()
            w2.cancel()

    run(main())
