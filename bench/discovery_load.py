"""Load benchmarks for the discovery service (loopback only, bounded in time).

    .venv/bin/python bench/discovery_load.py steady [--duration 10] [--watchers 1024]
    .venv/bin/python bench/discovery_load.py herd [--nodes 1024] [--one-address]
    .venv/bin/python bench/discovery_load.py herd --valkey [--replicas 3]

The service runs as its own process (``python -m control.discovery``) with its default
rate limit, so its CPU and RSS are its own and rate limiting stays on. Every simulated
node has its own gRPC connection and its own client address: the service trusts the
loopback peer as a proxy, and each node sends its address in X-Real-IP (``--one-address``
leaves the header out, so every node is 127.0.0.1, like a cluster behind one NAT).

steady: seeds 1,024 affiliates in one cluster plus many small clusters (5 each), attaches
one watcher per node of the big cluster (1,024), then

1. throughput: as many AffiliateUpdate calls as concurrent updaters can push for
   ``--duration`` s (updates/s sustained, watch messages and affiliates delivered/s);
2. fan-out latency: updates paced at ``--paced-rate``/s for ``--duration`` s; each update
   carries its send time (CLOCK_MONOTONIC, shared by both processes) inside its opaque
   data, and every watcher records receive time - send time (p50/p99).

Updates are refreshes as Talos sends them: new data, the node's same two endpoints.

herd: ``--nodes`` clients of one cluster start at once against a freshly started service,
each doing what Talos's discovery client does: wait its backoff (0.5 s +-50% the first
time), Hello (10 s timeout), Watch, AffiliateUpdate (30 s timeout); any failure ends the
session and it starts again after a growing backoff. Reports the time until every watcher
holds all ``--nodes`` affiliates, and every failed RPC. ``--valkey`` starts a private
valkey-server (unix socket in a temporary directory) and ``--replicas`` services on it
(``--store unix://...``); the clients are spread over the replicas round-robin, each
connecting straight to its replica (no load balancer in front).

The load generator is one Python process, so on a small machine it, not the service, may
be the limit; the CPU split is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from control.discovery.client import Backoff  # noqa: E402
from control.discovery.proto import cluster_pb2 as pb  # noqa: E402
from control.discovery.proto import cluster_pb2_grpc as pbg  # noqa: E402
from tests.control.discovery.valkeyproc import ValkeyProcess  # noqa: E402

BIG = "big-cluster"
TTL = 1800
DATA_SIZE = 400  # a Talos affiliate with KubeSpan encrypts to ~300-500 bytes
Metadata = tuple[tuple[str, str], ...]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1])  # kB
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Node:
    """One simulated machine: its affiliate, its address and its own gRPC connection."""

    def __init__(self, cluster: str, aid: str, address: str | None, target: str) -> None:
        self.cluster, self.aid, self.target = cluster, aid, target
        self.metadata: Metadata = (("x-real-ip", address),) if address else ()
        # Same two endpoints on every refresh (a node's addresses rarely change).
        digest = hashlib.sha256(f"{cluster}/{aid}".encode()).digest()
        self.endpoints = [digest[:16], digest[:32]]
        self.channel: grpc.aio.Channel | None = None

    def stub(self) -> pbg.ClusterStub:
        if self.channel is None:
            # A private subchannel pool: one TCP connection per node, as on real machines.
            self.channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
        return pbg.ClusterStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()

    def update_request(self, tag: int) -> pb.AffiliateUpdateRequest:
        # Send time first (the service treats data as opaque), random filler after.
        data = struct.pack("<dI", time.monotonic(), tag) + os.urandom(DATA_SIZE - 12)
        req = pb.AffiliateUpdateRequest(
            cluster_id=self.cluster,
            affiliate_id=self.aid,
            affiliate_data=data,
            affiliate_endpoints=self.endpoints,
        )
        req.ttl.seconds = TTL
        return req

    async def update(self, tag: int) -> None:
        await self.stub().AffiliateUpdate(
            self.update_request(tag), timeout=30, metadata=self.metadata
        )


def node_address(k: int, one_address: bool) -> str | None:
    return None if one_address else f"10.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


# -- service process ------------------------------------------------------------------


async def with_service(
    extra: list[str], body: Callable[[str, int], Awaitable[None]], timeout: float
) -> None:
    async def one(targets: list[str], pids: list[int]) -> None:
        await body(targets[0], pids[0])

    await with_services(extra, 1, one, timeout)


async def with_services(
    extra: list[str],
    count: int,
    body: Callable[[list[str], list[int]], Awaitable[None]],
    timeout: float,
) -> None:
    """Start ``count`` service processes (replicas when ``extra`` names a shared store)."""
    argv = [sys.executable, "-m", "control.discovery", "--listen", "127.0.0.1:0"]
    argv += ["--log-level", "warning", "--no-snapshot", *extra]
    servers: list[subprocess.Popen[str]] = []
    try:
        targets = []
        for _ in range(count):
            server = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
            servers.append(server)
            assert server.stdout is not None
            line = await asyncio.to_thread(server.stdout.readline)
            m = re.search(r":(\d+)$", line.strip())
            if not m:
                raise SystemExit(f"service did not start: {line!r}")
            targets.append(f"127.0.0.1:{m.group(1)}")
        await asyncio.wait_for(body(targets, [s.pid for s in servers]), timeout)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                await asyncio.to_thread(server.wait, 20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def service_flags(args: argparse.Namespace) -> list[str]:
    flags = [] if args.one_address else ["--trusted-proxy", "127.0.0.1/32"]
    if args.rate is not None:
        flags += ["--rate", str(args.rate)]
    if args.burst is not None:
        flags += ["--burst", str(args.burst)]
    return flags + args.service_arg


# -- steady state -----------------------------------------------------------------------


class Watcher:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.latencies: list[float] = []
        self.messages = 0
        self.affiliates = 0
        self.aborted = 0
        self.record = False
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            call = self.node.stub().Watch(
                pb.WatchRequest(cluster_id=BIG), metadata=self.node.metadata
            )
            try:
                first = True
                async for resp in call:
                    if first:
                        self.ready.set()
                        first = False
                        continue
                    self.messages += 1
                    self.affiliates += len(resp.affiliates)
                    if self.record and not resp.deleted:
                        now = time.monotonic()
                        for aff in resp.affiliates:
                            sent, _ = struct.unpack_from("<dI", aff.data)
                            self.latencies.append(now - sent)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ABORTED:
                    self.aborted += 1  # overflowed: reconnect, as a client would
                    continue
                raise


async def seed(nodes: list[Node]) -> None:
    sem = asyncio.Semaphore(64)

    async def one(node: Node) -> None:
        async with sem:
            await node.update(0)

    await asyncio.gather(*(one(n) for n in nodes))


async def hammer(
    big: list[Node], small: list[Node], duration: float, concurrency: int, paced: float | None
) -> int:
    done = 0
    deadline = time.monotonic() + duration
    interval = concurrency / paced if paced else 0.0

    async def worker(k: int) -> None:
        nonlocal done
        rng = random.Random(k)
        next_at = time.monotonic() + rng.random() * interval
        while time.monotonic() < deadline:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            # Most traffic on the big cluster (it has the watchers).
            node = rng.choice(big) if rng.random() < 0.8 or not small else rng.choice(small)
            await node.update(k)
            done += 1

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done


async def steady(args: argparse.Namespace, target: str, pid: int) -> None:
    big = [Node(BIG, f"node-{i}", node_address(i, args.one_address), target) for i in range(1024)]
    small = [
        Node(f"small-{c}", f"node-{i}", node_address(2048 + 5 * c + i, args.one_address), target)
        for c in range(args.small_clusters)
        for i in range(5)
    ]
    t0 = time.monotonic()
    await seed(big + small)
    took = time.monotonic() - t0
    n = len(big) + len(small)
    print(
        f"seeded {n} affiliates (1024 in one cluster + {args.small_clusters} x 5) in {took:.1f} s "
        f"({n / took:.0f} updates/s, no watchers)"
    )

    watchers = [Watcher(node) for node in big[: args.watchers]]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 120)
    print(f"{len(watchers)} watchers on the 1024-affiliate cluster; RSS {proc_status(pid)}")

    cpu0, me0, t0 = proc_cpu(pid), time.process_time(), time.monotonic()
    msgs0 = sum(w.messages for w in watchers)
    affs0 = sum(w.affiliates for w in watchers)
    done = await hammer(big, small, args.duration, args.concurrency, None)
    wall = time.monotonic() - t0
    msgs = sum(w.messages for w in watchers) - msgs0
    affs = sum(w.affiliates for w in watchers) - affs0
    print(
        f"throughput: {done / wall:.0f} updates/s sustained over {wall:.1f} s "
        f"({args.concurrency} concurrent callers); delivered {msgs / wall:.0f} watch messages/s "
        f"carrying {affs / wall:.0f} affiliates/s; "
        f"watch overflows (ABORTED, reconnected): {sum(w.aborted for w in watchers)}"
    )
    print(
        f"  CPU: service {100 * (proc_cpu(pid) - cpu0) / wall:.0f}%, load generator "
        f"{100 * (time.process_time() - me0) / wall:.0f}% of one core"
    )

    await settle(watchers)
    for w in watchers:
        w.record = True
    aborted0 = sum(w.aborted for w in watchers)
    cpu0, t0 = proc_cpu(pid), time.monotonic()
    done = await hammer(big, small, args.duration, min(args.concurrency, 16), args.paced_rate)
    await settle(watchers)
    wall = time.monotonic() - t0
    lat = [x for w in watchers for x in w.latencies]
    print(
        f"fan-out latency at {args.paced_rate:.0f} updates/s paced ({done} updates, "
        f"{len(lat)} deliveries to {len(watchers)} watchers): "
        f"p50 {1000 * pct(lat, 0.50):.1f} ms, p99 {1000 * pct(lat, 0.99):.1f} ms, "
        f"max {1000 * max(lat, default=float('nan')):.1f} ms; "
        f"overflows {sum(w.aborted for w in watchers) - aborted0}; "
        f"service CPU {100 * (proc_cpu(pid) - cpu0) / wall:.0f}%"
    )
    st = proc_status(pid)
    print(f"server RSS {st['VmRSS'] / 1024:.1f} MiB (peak {st['VmHWM'] / 1024:.1f} MiB)")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(n.close() for n in big + small))


async def settle(watchers: list[Watcher]) -> None:
    """Wait until no watcher received anything for half a second (deliveries drained)."""
    last = -1
    while (now := sum(w.affiliates for w in watchers)) != last:
        last = now
        await asyncio.sleep(0.5)


# -- thundering herd --------------------------------------------------------------------


class HerdNode:
    """A Talos discovery client's session loop, reduced to what the service sees."""

    def __init__(self, node: Node, n: int, stats: HerdStats) -> None:
        self.node, self.n, self.stats = node, n, stats
        self.known: set[str] = set()
        self.converged_at: float | None = None

    def fail(self, method: str, err: BaseException) -> None:
        code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
        self.stats.failures[(method, code)] += 1

    async def run(self) -> None:
        backoff = Backoff()
        md = self.node.metadata
        while True:
            await asyncio.sleep(backoff.next())
            stub = self.node.stub()
            self.stats.sessions += 1
            try:
                sent = time.monotonic()
                await stub.Hello(
                    pb.HelloRequest(cluster_id=self.node.cluster, client_version="bench"),
                    timeout=10,
                    metadata=md,
                )
                self.stats.hello_latency.append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as err:
                self.fail("Hello", err)
                await self.node.close()  # Talos drops the connection after a failed Hello
                continue
            call = stub.Watch(pb.WatchRequest(cluster_id=self.node.cluster), metadata=md)
            reader = asyncio.create_task(self.read(call))
            try:
                await stub.AffiliateUpdate(self.node.update_request(0), timeout=30, metadata=md)
                self.stats.updated_at.append(time.monotonic())
                backoff.reset()
            except grpc.aio.AioRpcError as err:
                self.fail("AffiliateUpdate", err)
                call.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                continue
            try:
                await reader
            except grpc.aio.AioRpcError as err:
                self.fail("Watch", err)

    async def read(self, call: Any) -> None:
        first = True
        async for resp in call:
            if first:
                self.known = set()
                first = False
                self.stats.snapshot_at.append(time.monotonic())
            self.stats.messages += 1
            for aff in resp.affiliates:
                if resp.deleted:
                    self.known.discard(aff.id)
                else:
                    self.known.add(aff.id)
            if self.converged_at is None and len(self.known) >= self.n:
                self.converged_at = time.monotonic()
                self.stats.converged += 1
                if self.stats.converged == self.n:
                    self.stats.all_converged.set()


class HerdStats:
    def __init__(self) -> None:
        self.failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sessions = 0
        self.hello_latency: list[float] = []
        self.snapshot_at: list[float] = []  # when each watch's first message came
        self.updated_at: list[float] = []  # when each AffiliateUpdate returned
        self.messages = 0
        self.converged = 0
        self.all_converged = asyncio.Event()


async def herd(
    args: argparse.Namespace, targets: list[str], pids: list[int], store_pid: int | None
) -> None:
    stats = HerdStats()
    nodes = [
        HerdNode(
            Node(BIG, f"node-{i}", node_address(i, args.one_address), targets[i % len(targets)]),
            args.nodes,
            stats,
        )
        for i in range(args.nodes)
    ]

    def service_cpu() -> float:
        return sum(proc_cpu(pid) for pid in pids)

    cpu0, me0, t0 = service_cpu(), time.process_time(), time.monotonic()
    store0 = proc_cpu(store_pid) if store_pid else 0.0
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        await asyncio.wait_for(stats.all_converged.wait(), args.timeout)
    except TimeoutError:
        pass
    wall = time.monotonic() - t0
    cpu = service_cpu() - cpu0
    store_cpu = proc_cpu(store_pid) - store0 if store_pid else 0.0
    times = sorted(n.converged_at - t0 for n in nodes if n.converged_at is not None)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(n.node.close() for n in nodes))
    where = "one address" if args.one_address else "one address each"
    if args.valkey:
        setup = (
            f"{len(targets)} replicas on one valkey-server, clients spread round-robin "
            "straight to the replicas (no load balancer)"
        )
    else:
        setup = "1 process, in memory"
    print(
        f"herd of {args.nodes} ({where}, {setup}, service flags "
        f"{' '.join(service_flags(args)) or '-'}): "
        + (
            f"all converged in {times[-1]:.1f} s"
            if len(times) == args.nodes
            else f"{len(times)} of {args.nodes} converged within {args.timeout:.0f} s"
        )
    )
    if times:
        print(
            f"  converged: 50% at {pct(times, 0.5):.1f} s, 90% at {pct(times, 0.9):.1f} s, "
            f"99% at {pct(times, 0.99):.1f} s"
        )
    for what, when in (("watch snapshots", stats.snapshot_at), ("updates", stats.updated_at)):
        at = [t - t0 for t in when]
        print(
            f"  {what}: 50% at {pct(at, 0.5):.1f} s, 99% at {pct(at, 0.99):.1f} s, "
            f"last at {max(at, default=float('nan')):.1f} s"
        )
    hl = stats.hello_latency
    print(
        f"  Hello latency: p50 {1000 * pct(hl, 0.5):.0f} ms, p99 {1000 * pct(hl, 0.99):.0f} ms, "
        f"max {1000 * max(hl, default=float('nan')):.0f} ms"
    )
    failed = sum(stats.failures.values())
    detail = ", ".join(f"{m} {c}: {k}" for (m, c), k in sorted(stats.failures.items()))
    print(f"  failed RPCs: {failed}" + (f" ({detail})" if detail else ""))
    valkey = f", valkey-server {100 * store_cpu / wall:.0f}%" if store_pid else ""
    replicas = f" ({len(pids)} replicas together)" if len(pids) > 1 else ""
    print(
        f"  sessions started {stats.sessions}, watch messages received {stats.messages}; CPU over "
        f"{wall:.1f} s: service {100 * cpu / wall:.0f}%{replicas}{valkey}, load generator "
        f"{100 * (time.process_time() - me0) / wall:.0f}% of one core"
    )


def run_herd(args: argparse.Namespace) -> None:
    if not args.valkey:
        if args.replicas != 1:
            raise SystemExit("--replicas > 1 needs --valkey (in-memory replicas share nothing)")
        asyncio.run(
            with_services(
                service_flags(args),
                1,
                lambda targets, pids: herd(args, targets, pids, None),
                args.timeout + 60,
            )
        )
        return
    with tempfile.TemporaryDirectory(prefix="herd-valkey-") as tmp:
        store = ValkeyProcess(Path(tmp))
        store.start()
        try:
            assert store.proc is not None
            store_pid = store.proc.pid
            asyncio.run(
                with_services(
                    [*service_flags(args), "--store", store.url],
                    args.replicas,
                    lambda targets, pids: herd(args, targets, pids, store_pid),
                    args.timeout + 60,
                )
            )
        finally:
            store.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--one-address", action="store_true", help="every node on 127.0.0.1")
    common.add_argument("--rate", type=float, help="service --rate (default: its own)")
    common.add_argument("--burst", type=int, help="service --burst (default: its own)")
    common.add_argument(
        "--service-arg", action="append", default=[], help="extra service flag (repeatable)"
    )
    st = sub.add_parser("steady", parents=[common], help="throughput and fan-out latency")
    st.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    st.add_argument("--watchers", type=int, default=1024)
    st.add_argument("--small-clusters", type=int, default=300)
    st.add_argument("--concurrency", type=int, default=64)
    st.add_argument("--paced-rate", type=float, default=20.0)
    hd = sub.add_parser("herd", parents=[common], help="all nodes of a cluster connect at once")
    hd.add_argument("--nodes", type=int, default=1024)
    hd.add_argument("--timeout", type=float, default=120.0)
    hd.add_argument(
        "--valkey", action="store_true", help="keep the state in a private valkey-server"
    )
    hd.add_argument(
        "--replicas", type=int, default=1, help="service processes (more than 1 needs --valkey)"
    )
    args = p.parse_args()
    if args.mode == "steady":
        asyncio.run(
            with_service(
                service_flags(args),
                lambda target, pid: steady(args, target, pid),
                10 * args.duration + 300,
            )
        )
    else:
        run_herd(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
