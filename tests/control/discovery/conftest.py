"""Fixtures for the discovery tests: an in-process service on loopback, secrets, affiliates.

``server`` and ``make_server`` are parametrized over the stores: every test that uses
them runs on the in-memory state, on a private valkey-server (on a unix socket) and on a
private three-node Valkey Cluster (one of each per test session, emptied before each
test). ``make_memory_server`` is for the
tests of what only the in-memory store has (snapshot files, a restart that loses state).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Any, TypeVar

import grpc
import pytest

from control.affiliate import Address, Affiliate, KubeSpanInfo
from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg
from tests.control.discovery.services import service_factory
from tests.control.discovery.threaded import ThreadedServer
from tests.control.discovery.valkeyproc import ValkeyCluster, ValkeyProcess

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run a coroutine on a fresh loop with a hard timeout (tests are sync functions)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition that settles asynchronously; fail with `what` if it never holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def new_secret() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def endpoints_of(affiliate: Affiliate) -> tuple[Address, ...]:
    assert affiliate.kubespan is not None, f"{affiliate.node_id} has no KubeSpan part"
    return affiliate.kubespan.endpoints


def make_affiliate(name: str, n: int = 1, endpoints: tuple = ()) -> Affiliate:
    return Affiliate(
        node_id=name,
        hostname=f"{name}.example",
        nodename=name,
        machine_type="worker",
        operating_system="Talos (v1.9.0)",
        addresses=(ip_address(f"10.5.0.{n}"), ip_address(f"fd00:5::{n:x}")),
        kubespan=KubeSpanInfo(
            public_key=base64.b64encode(bytes([n]) * 32).decode(),
            address=IPv6Address(f"fd7f:175a:b97c:5602::{n:x}"),
            additional_addresses=(ip_network(f"10.244.{n}.0/24"),),
            endpoints=endpoints or ((f"10.5.0.{n}", 51820),),
        ),
    )


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyProcess]:
    server = ValkeyProcess(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["memory", "valkey", "valkey-cluster"])
def store_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The server options that select a store: none (in memory), or an empty Valkey."""
    if request.param == "memory":
        return {}
    if request.param == "valkey":
        server: ValkeyProcess = request.getfixturevalue("valkey")
        server.flush()
        return {"store": server.url}
    cluster: ValkeyCluster = request.getfixturevalue("valkey_cluster")
    cluster.flush()
    return {"store": cluster.url, "store_cluster": True}


@pytest.fixture
def make_server(store_options: dict[str, Any]) -> Iterator[Callable[..., ThreadedServer]]:
    """Start services on 127.0.0.1 in background threads; all stopped at teardown."""
    yield from service_factory(store_options)


@pytest.fixture
def make_memory_server() -> Iterator[Callable[..., ThreadedServer]]:
    """``make_server`` with the in-memory store only."""
    yield from service_factory()


@pytest.fixture
def server(make_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return make_server(gc_interval=0.2)


def target(server: ThreadedServer) -> str:
    return f"127.0.0.1:{server.port}"


class Raw:
    """A plain gRPC stub on its own channel, for speaking the API without our client."""

    def __init__(self, server: ThreadedServer) -> None:
        self.channel = grpc.aio.insecure_channel(target(server))
        self.stub = pbg.ClusterStub(self.channel)

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def update(
        self, cluster: str, aid: str, data: bytes | None = b"d", endpoints=(), ttl: float = 60.0
    ) -> None:
        req = pb.AffiliateUpdateRequest(
            cluster_id=cluster, affiliate_id=aid, affiliate_endpoints=list(endpoints)
        )
        if data is not None:
            req.affiliate_data = data
        req.ttl.FromNanoseconds(int(ttl * 1e9))
        await self.stub.AffiliateUpdate(req, timeout=10)

    async def list(self, cluster: str) -> dict[str, tuple[bytes, tuple[bytes, ...]]]:
        resp = await self.stub.List(pb.ListRequest(cluster_id=cluster), timeout=10)
        return {a.id: (a.data, tuple(a.endpoints)) for a in resp.affiliates}
