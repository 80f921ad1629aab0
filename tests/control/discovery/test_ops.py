"""Operations: client addresses behind proxies, health, metrics, request log, TLS reload,
stream caps, flags, snapshots. Real service, real gRPC clients."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proxyaddr import ProxyTrust, parse_ip

from .conftest import Raw, run
from .services import Factory, service_factory

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def make_service() -> Iterator[Factory]:
    yield from service_factory()


def _ip(raw: bytes) -> str:
    from ipaddress import ip_address

    return str(ip_address(raw))


async def _hello_ip(raw: Raw, metadata: tuple = (), timeout: float = 5) -> str:
    resp = await raw.stub.Hello(pb.HelloRequest(cluster_id="c"), metadata=metadata, timeout=timeout)
    return _ip(resp.client_ip)


def test_client_address_from_trusted_proxy_headers(make_service):
    server = make_service(trusted_proxies=["127.0.0.0/8"])

    async def main() -> None:
        async with Raw(server) as raw:
            assert await _hello_ip(raw) == "127.0.0.1"  # no header: the peer
            assert await _hello_ip(raw, (("x-real-ip", "2001:db8::7"),)) == "2001:db8::7"
            # X-Forwarded-For from the right, skipping our own proxies (127.0.0.0/8).
            xff = (("x-forwarded-for", "198.51.100.1, 203.0.113.9, 127.0.0.5"),)
            assert await _hello_ip(raw, xff) == "203.0.113.9"
            # X-Real-IP wins; a malformed one falls back to X-Forwarded-For.
            both = (("x-real-ip", "192.0.2.4"), ("x-forwarded-for", "203.0.113.9"))
            assert await _hello_ip(raw, both) == "192.0.2.4"
            bad = (("x-real-ip", "nope"), ("x-forwarded-for", "203.0.113.9:4711"))
            assert await _hello_ip(raw, bad) == "203.0.113.9"

    run(main())


def test_headers_from_an_untrusted_peer_are_ignored(make_service):
    server = make_service(trusted_proxies=["10.0.0.0/8"])

    async def main() -> None:
        async with Raw(server) as raw:
            spoof = (("x-real-ip", "192.0.2.4"), ("x-forwarded-for", "203.0.113.9"))
            assert await _hello_ip(raw, spoof) == "127.0.0.1"

    run(main())


def test_rate_limit_keys_on_the_real_client(make_service):
    server = make_service(trusted_proxies=["127.0.0.0/8"], ip_rate=0.1, ip_burst=3)

    async def main() -> None:
        async with Raw(server) as raw:  # one proxy connection carrying two clients
            a = (("x-forwarded-for", "203.0.113.1"),)
            b = (("x-forwarded-for", "203.0.113.2"),)
            for _ in range(3):
                await _hello_ip(raw, a)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _hello_ip(raw, a, timeout=0.5)
            assert info.value.code() == EXHAUSTED
            assert await _hello_ip(raw, b) == "203.0.113.2"
            # The proxy itself, naming no client, is not charged as an address.
            for _ in range(5):
                assert await _hello_ip(raw) == "127.0.0.1"

    run(main())


def test_forwarded_for_parsing():
    trust = ProxyTrust(["10.0.0.0/8", "fd00::/8"])
    client = trust.client
    assert client("ipv4:10.1.1.1:5", [("x-forwarded-for", "1.2.3.4")]).ip == "1.2.3.4"
    # Several headers are one list; every hop trusted -> the leftmost.
    hops = [("x-forwarded-for", "10.0.0.9"), ("x-forwarded-for", "10.0.0.8")]
    assert client("ipv4:10.1.1.1:5", hops).ip == "10.0.0.9"
    # A malformed hop ends the walk: nothing left of it is believed.
    assert client("ipv4:10.1.1.1:5", [("x-forwarded-for", "1.2.3.4, junk, 10.2.2.2")]).ip == (
        "10.2.2.2"
    )
    got = client("ipv6:[fd00::1]:5", [("x-forwarded-for", "[2001:db8::1]:443")])
    assert got.ip == "2001:db8::1" and got.forwarded
    nothing = client("ipv4:10.1.1.1:5", [("x-forwarded-for", "junk")])
    assert nothing.ip == "10.1.1.1" and not nothing.forwarded and nothing.via_trusted_proxy
    assert client("unix:/run/x.sock", [("x-real-ip", "1.2.3.4")]).ip is None
    assert parse_ip("::ffff:192.0.2.1") == "192.0.2.1"


def test_concurrent_streams_per_connection_are_capped(make_service):
    server = make_service(max_streams_per_connection=4)

    async def main() -> None:
        async with Raw(server) as raw:
            await _hello_ip(raw)  # the connection's settings (the cap) are known from here
            calls = [raw.stub.Watch(pb.WatchRequest(cluster_id="s")) for _ in range(6)]
            for call in calls[:4]:
                await call.read()
            # The fifth and sixth wait in the client for a free stream: one ends, one starts.
            calls[0].cancel()
            await calls[4].read()
            assert server.call(server.state.subscriptions_count) == 4
            calls[1].cancel()
            await calls[5].read()
            assert server.call(server.state.subscriptions_count) == 4
            for call in calls:
                call.cancel()

    run(main())
