"""Operations: client addresses behind proxies, health, metrics, request log, TLS reload,
stream caps, flags, snapshots. Real service, real gRPC clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.discovery.health import CLUSTER_SERVICE
from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg
from control.discovery.proxyaddr import ProxyTrust, parse_ip
from control.discovery.state import State
from tests.control.discovery.threaded import ThreadedServer
from tests.promtext import key, samples

from .conftest import Raw, run, target
from .services import Factory, service_factory
from .test_service import _self_signed

T = TypeVar("T")

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


def _on_loop(server: ThreadedServer, coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on the service's own loop (from the test's thread)."""
    assert server._own_loop is not None
    return asyncio.run_coroutine_threadsafe(coro_fn(), server._own_loop).result(timeout=60)


def test_health_serving_hook_and_shutdown(make_service):
    server = make_service()
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def check(stub: Any, service: str) -> int:
        req = health_pb2.HealthCheckRequest(service=service)
        return (await stub.Check(req, timeout=5)).status

    async def main() -> None:
        async with grpc.aio.insecure_channel(target(server)) as ch:
            stub: Any = health_pb2_grpc.HealthStub(ch)  # its type stub lacks the methods
            assert await check(stub, "") == serving
            assert await check(stub, CLUSTER_SERVICE) == serving
            await asyncio.to_thread(_on_loop, server, lambda: server.set_serving(False))
            assert await check(stub, "") == not_serving
            assert await check(stub, CLUSTER_SERVICE) == not_serving
            await asyncio.to_thread(_on_loop, server, lambda: server.set_serving(True))
            assert await check(stub, CLUSTER_SERVICE) == serving
            # A load balancer watching health sees NOT_SERVING as the service stops.
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=CLUSTER_SERVICE))
            assert (await watch.read()).status == serving
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            assert (await watch.read()).status == not_serving
            await stopping

    run(main())


def test_metrics_latency_by_code_and_hello_by_client_version(make_service):
    server = make_service(metrics_port=0)

    async def main() -> str:
        async with Raw(server) as raw:
            for version in ("v1.9.3", "v1.9.5", "kubespan-py/0.1.0", ""):
                await raw.stub.Hello(
                    pb.HelloRequest(cluster_id="m", client_version=version), timeout=5
                )
            await raw.update("m", "a")
            with pytest.raises(grpc.aio.AioRpcError):
                await raw.update("m", "", data=b"x")  # empty affiliate ID: INVALID_ARGUMENT
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        return await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode()
        )

    got = samples(run(main()))
    hello = "discovery_server_hello_requests_total"
    assert got[key(hello, client_version="v1.9")] == 2
    assert got[key(hello, client_version="kubespan-py/v0.1")] == 1
    assert got[key(hello, client_version="unknown")] == 1
    duration = "discovery_server_request_duration_seconds"
    assert got[key(duration + "_count", method="Hello", code="OK")] == 4
    assert got[key(duration + "_bucket", method="Hello", code="OK", le="+Inf")] == 4
    assert got[key(duration + "_count", method="AffiliateUpdate", code="INVALID_ARGUMENT")] == 1
    assert 0 < got[key(duration + "_sum", method="AffiliateUpdate", code="OK")] < 10
    assert got[key("discovery_state_affiliates")] == 1
    assert got[key("discovery_server_requests_total", method="Hello", code="OK")] == 4


def test_tls_certificate_is_reloaded_when_its_files_change(make_service, tmp_path):
    for name in "abc":
        (tmp_path / name).mkdir()
    a_cert, a_key, a_pem = _self_signed(tmp_path / "a")
    _, b_key, b_pem = _self_signed(tmp_path / "b")
    _, c_key, _ = _self_signed(tmp_path / "c")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(a_cert, live / "tls.crt")
    shutil.copy(a_key, live / "tls.key")
    server = make_service(tls_cert_file=str(live / "tls.crt"), tls_key_file=str(live / "tls.key"))

    async def hello(root_pem: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
        # A fresh channel: a new connection, so a new handshake with what the service has now.
        async with grpc.aio.secure_channel(
            f"localhost:{server.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as ch:
            await pbg.ClusterStub(ch).Hello(pb.HelloRequest(cluster_id="t"), timeout=5)

    def install(cert: str, key_file: str) -> None:
        for src, name in ((cert, "tls.crt"), (key_file, "tls.key")):
            shutil.copy(src, live / (name + ".new"))
            os.replace(live / (name + ".new"), live / name)

    async def main() -> None:
        await hello(a_pem)
        install(str(tmp_path / "b" / "tls.crt"), b_key)
        await hello(b_pem)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await hello(a_pem)  # the old certificate is gone
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Half a renewal (B's certificate, C's key) is not loaded: B stays.
        shutil.copy(c_key, live / "tls.key.new")
        os.replace(live / "tls.key.new", live / "tls.key")
        await hello(b_pem)

    run(main())
    assert server.tls is not None and server.tls.reloads == 1


def test_snapshot_is_written_without_holding_the_loop(make_service, tmp_path):
    path = tmp_path / "state.binpb"
    server = make_service(snapshot_path=str(path), metrics_port=0)

    def fill() -> None:
        now = server.clock()
        for c in range(20):
            for i in range(1000):
                server.state.update(f"c{c}", f"n{i}", b"d" * 300, [bytes([i % 256]) * 16], 600, now)

    server.call(fill)

    async def save_counting_turns() -> int:
        turns = 0
        done = False

        async def tick() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        await server.save_snapshot()
        done = True
        await ticker
        return turns

    # 20,000 affiliates in slices of 2,000, each encoded and written in a thread: the loop
    # keeps turning meanwhile (one blocking export would give it one turn at most).
    assert _on_loop(server, save_counting_turns) >= 10
    restored = State()
    assert restored.import_snapshot(path.read_bytes(), 0.0, 0.0) == 20_000
    assert restored.stats().endpoints == 20_000
    assert not (tmp_path / "state.binpb.tmp").exists()
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    got = samples(urllib.request.urlopen(url, timeout=10).read().decode())
    assert got[key("discovery_snapshot_writes_total", result="ok")] == 1
    assert got[key("discovery_snapshot_size_bytes")] == path.stat().st_size
    assert got[key("discovery_snapshot_last_success_timestamp_seconds")] > 0


class _Process:
    """`python -m control.discovery ARGS` on a free port; stdout's first line names it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control.discovery", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        assert "discovery service on" in line, line + self.proc.stderr.read()
        self.target = f"127.0.0.1:{line.rsplit(':', 1)[1].strip()}"

    def stop(self) -> str:
        """SIGTERM; returns stderr once it has exited (0)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return err


def test_service_command_flags_state_dir_and_request_log(tmp_path):
    state_dir = tmp_path / "state"
    first = _Process(
        "--state-dir",
        str(state_dir),
        "--log-requests",
        "--limit-affiliates-per-cluster",
        "2",
        "--shutdown-grace",
        "0.5",
    )

    async def use(addr: str) -> None:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pbg.ClusterStub(ch)
            await stub.Hello(pb.HelloRequest(cluster_id="cli", client_version="v1.9.0"), timeout=5)
            for aid in ("a", "b"):
                req = pb.AffiliateUpdateRequest(cluster_id="cli", affiliate_id=aid)
                req.affiliate_data = b"d"
                req.ttl.seconds = 600
                await stub.AffiliateUpdate(req, timeout=5)
            req.affiliate_id = "c"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.AffiliateUpdate(req, timeout=5)
            assert info.value.code() == EXHAUSTED  # --limit-affiliates-per-cluster 2
            health: Any = health_pb2_grpc.HealthStub(ch)  # its type stub lacks the methods
            got = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.SERVING

    try:
        run(use(first.target))
    finally:
        err = first.stop()
    lines = [json.loads(ln.split(": ", 1)[1]) for ln in err.splitlines() if "requests:" in ln]
    assert [(x["method"], x["code"]) for x in lines] == [
        ("Hello", "OK"),
        ("AffiliateUpdate", "OK"),
        ("AffiliateUpdate", "OK"),
        ("AffiliateUpdate", "RESOURCE_EXHAUSTED"),
    ]
    assert lines[0]["client"] == "127.0.0.1" and lines[0]["client_version"] == "v1.9.0"
    assert lines[1]["affiliate"] == "a" and len(lines[1]["cluster"]) == 8
    # The snapshot went to the state directory on SIGTERM; systemd's $STATE_DIRECTORY
    # names the same place for the next start, which restores it.
    assert (state_dir / "discovery.binpb").exists()
    second = _Process(env={"STATE_DIRECTORY": str(state_dir)})

    async def listed(addr: str) -> set[str]:
        async with grpc.aio.insecure_channel(addr) as ch:
            resp = await pbg.ClusterStub(ch).List(pb.ListRequest(cluster_id="cli"), timeout=5)
            return {a.id for a in resp.affiliates}

    try:
        assert run(listed(second.target)) == {"a", "b"}
    finally:
        second.stop()
