"""Several discovery services: the merge of what they report, and pools of clients
against two real services on loopback (one stopped, restarted empty, left)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv6Address, ip_address, ip_network

from control.affiliate import Affiliate, KubeSpanInfo
from control.discovery.client import Backoff, DiscoveryClient
from control.discovery.pool import DiscoveryPool, ServiceTarget, delete_affiliate, merge_affiliates
from tests.control.discovery.threaded import ThreadedServer

from .conftest import Raw, eventually, make_affiliate, new_secret, run


def test_merge_unites_lists_takes_later_scalars_and_keeps_ids_known_to_one_service() -> None:
    a1 = make_affiliate("a", 1, endpoints=(("10.5.0.1", 51820),))
    assert a1.kubespan is not None
    a2 = replace(
        a1,
        hostname="",  # unknown here: the first service's stays
        nodename="a-renamed",
        addresses=(ip_address("10.5.0.1"), ip_address("10.6.0.1")),
        kubespan=replace(
            a1.kubespan,
            endpoints=(("10.6.0.1", 51820), ("10.5.0.1", 51820)),
            additional_addresses=(ip_network("10.245.0.0/24"),),
        ),
        control_plane_api_port=6443,
    )
    b = make_affiliate("b", 2)
    c = Affiliate(node_id="c", hostname="c.example")  # no KubeSpan on the first service
    c_ks = replace(
        c,
        hostname="",
        kubespan=KubeSpanInfo(public_key="k", address=IPv6Address("fd00::c")),
    )

    merged = merge_affiliates([{"a": a1, "c": c}, {"a": a2, "b": b, "c": c_ks}])

    assert list(merged) == ["a", "c", "b"]
    a = merged["a"]
    assert a.hostname == "a.example" and a.nodename == "a-renamed"
    assert a.addresses == (ip_address("10.5.0.1"), ip_address("fd00:5::1"), ip_address("10.6.0.1"))
    assert a.kubespan is not None
    assert a.kubespan.endpoints == (("10.5.0.1", 51820), ("10.6.0.1", 51820))
    assert a.kubespan.additional_addresses == (
        ip_network("10.244.1.0/24"),
        ip_network("10.245.0.0/24"),
    )
    assert a.control_plane_api_port == 6443
    assert merged["b"] == b
    assert merged["c"].hostname == "c.example" and merged["c"].kubespan == c_ks.kubespan
    assert merge_affiliates([{"a": a1}]) == {"a": a1}
    assert merge_affiliates([]) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fast_client(*args, **kwargs) -> DiscoveryClient:
    # A fresh short backoff per client (a Backoff keeps state).
    return DiscoveryClient(*args, backoff=Backoff(initial=0.05, maximum=0.5), **kwargs)


def test_pool_publishes_on_every_service_and_a_node_stays_while_one_is_up(
    make_memory_server: Callable[..., ThreadedServer],
) -> None:
    # Two independent services, each with its own state (two replicas on one Valkey
    # would be one service seen twice).
    make_server = make_memory_server
    ports = [_free_port(), _free_port()]
    servers = [make_server(port) for port in ports]
    services = [ServiceTarget(f"s{i}", f"127.0.0.1:{p}", True) for i, p in enumerate(ports)]
    secret = new_secret()

    def pool(name: str) -> DiscoveryPool:
        return DiscoveryPool("pool", secret, name, client_factory=_fast_client)

    async def listed(server: ThreadedServer) -> set[str]:
        async with Raw(server) as raw:
            return set(await raw.list("pool"))

    async def main() -> None:
        a, b, c = pool("a"), pool("b"), pool("c")
        changes: list[int] = []
        b._on_change = lambda: changes.append(1)
        a.set_local(make_affiliate("a", 1))  # before the clients exist: each gets it
        b.set_local(make_affiliate("b", 2))
        await a.configure(services)
        await b.configure(services)
        try:
            await eventually(lambda: set(b.affiliates) == {"a"}, "b sees a")
            await eventually(lambda: set(a.affiliates) == {"b"}, "a sees b")
            assert changes, "b's pool reports changes"
            for server in servers:  # both services carry both nodes
                await _wait_listed(server, {"a", "b"}, listed)
            assert a.public_ip == ip_address("127.0.0.1")

            # The first service goes down and comes back empty: a stays known on b.
            await asyncio.to_thread(servers[0].stop)
            assert set(b.affiliates) == {"a"}
            c.set_local(make_affiliate("c", 3))
            await c.configure(services)  # c only reaches the second service for now
            await eventually(lambda: set(b.affiliates) == {"a", "c"}, "b sees c via s1")
            servers[0] = await asyncio.to_thread(make_server, ports[0])
            await _wait_listed(servers[0], {"a", "b", "c"}, listed)
            assert set(b.affiliates) == {"a", "c"}

            # The second service goes away for good: nothing changes for b.
            await asyncio.to_thread(servers[1].stop)
            await b.configure(services[:1])
            assert list(b.clients) == ["s0"]
            assert set(b.affiliates) == {"a", "c"}

            # Closing keeps the registration (a restart must not drop the node) ...
            await c.close()
            assert "c" in await listed(servers[0])
            assert set(b.affiliates) == {"a", "c"}
            # ... leaving deletes it, and b sees it go.
            a_results = await a.close(leave=True)
            assert a_results["s0"] is None and a_results["s1"] is not None  # s1 is down
            await eventually(lambda: set(b.affiliates) == {"c"}, "b sees a leave")
            assert await listed(servers[0]) == {"b", "c"}
        finally:
            for p in (a, b, c):
                await p.close()

    run(main(), timeout=120)


async def _wait_listed(server, want: set[str], listed) -> set[str]:
    for _ in range(400):
        got = await listed(server)
        if want <= got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"{want} never all listed on {server.port}: {got}")


def test_delete_affiliate_reports_each_service(make_server) -> None:
    server = make_server()
    secret = new_secret()
    up = ServiceTarget("up", f"127.0.0.1:{server.port}", True)
    down = ServiceTarget("down", f"127.0.0.1:{_free_port()}", True)

    async def main() -> None:
        async with Raw(server) as raw:
            await raw.update("del", "n1")
            results = await delete_affiliate([up, down], "del", secret, "n1", timeout=2)
            assert results["up"] is None
            assert results["down"] is not None and "UNAVAILABLE" in results["down"]
            assert await raw.list("del") == {}

    run(main())
