"""Load benchmark for the discovery service (loopback only, bounded in time).

    .venv/bin/python bench/discovery_load.py [--duration 10] [--watchers 32] [--small-clusters 300]

The service runs as its own process (``python -m control.discovery``) so its RSS and CPU
are its own. This process seeds 1024 affiliates in one cluster plus many small clusters
(5 affiliates each), attaches watchers to the big cluster, then:

1. throughput: as many AffiliateUpdate calls as concurrent updaters can push for
   ``--duration`` s (updates/s sustained, watch messages delivered/s);
2. fan-out latency: updates paced at ``--paced-rate``/s for ``--duration`` s; each update
   carries its send time (CLOCK_MONOTONIC, shared by both processes) inside its opaque
   data, and every watcher records receive time - send time (p50/p99).

Reports server RSS (current and peak). The load generator is one Python process, so on a
small machine it, not the service, may be the limit; the CPU split is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from control.discovery.proto import cluster_pb2 as pb  # noqa: E402
from control.discovery.proto import cluster_pb2_grpc as pbg  # noqa: E402

BIG = "big-cluster"
TTL = 1800
DATA_SIZE = 400  # a Talos affiliate with KubeSpan encrypts to ~300-500 bytes


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1])  # kB
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def payload(tag: int) -> bytes:
    # Send time first (the service treats data as opaque), random filler after.
    return struct.pack("<dI", time.monotonic(), tag) + os.urandom(DATA_SIZE - 12)


def request(cluster: str, aid: str, tag: int) -> pb.AffiliateUpdateRequest:
    req = pb.AffiliateUpdateRequest(
        cluster_id=cluster,
        affiliate_id=aid,
        affiliate_data=payload(tag),
        affiliate_endpoints=[os.urandom(16), os.urandom(32)],
    )
    req.ttl.seconds = TTL
    return req


class Watcher:
    def __init__(self, stub: pbg.ClusterStub) -> None:
        self.stub = stub
        self.latencies: list[float] = []
        self.messages = 0
        self.aborted = 0
        self.record = False
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            call = self.stub.Watch(pb.WatchRequest(cluster_id=BIG))
            try:
                first = True
                async for resp in call:
                    if first:
                        self.ready.set()
                        first = False
                        continue
                    self.messages += 1
                    if self.record and not resp.deleted:
                        sent, _ = struct.unpack_from("<dI", resp.affiliates[0].data)
                        self.latencies.append(time.monotonic() - sent)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ABORTED:
                    self.aborted += 1  # overflowed: reconnect, as a client would
                    continue
                raise


async def seed(stubs: list[pbg.ClusterStub], small_clusters: int) -> int:
    jobs = [(BIG, f"node-{i}") for i in range(1024)]
    jobs += [(f"small-{c}", f"node-{i}") for c in range(small_clusters) for i in range(5)]
    sem = asyncio.Semaphore(64)

    async def one(k: int, cluster: str, aid: str) -> None:
        async with sem:
            await stubs[k % len(stubs)].AffiliateUpdate(request(cluster, aid, 0), timeout=30)

    await asyncio.gather(*(one(k, c, a) for k, (c, a) in enumerate(jobs)))
    return len(jobs)


async def hammer(
    stubs, duration: float, concurrency: int, small_clusters: int, paced_rate: float | None
) -> int:
    done = 0
    deadline = time.monotonic() + duration
    interval = concurrency / paced_rate if paced_rate else 0.0

    async def worker(k: int) -> None:
        nonlocal done
        rng = random.Random(k)
        stub = stubs[k % len(stubs)]
        next_at = time.monotonic() + rng.random() * interval
        while time.monotonic() < deadline:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            if rng.random() < 0.8:  # most traffic on the big cluster (it has the watchers)
                cluster, aid = BIG, f"node-{rng.randrange(1024)}"
            else:
                cluster, aid = f"small-{rng.randrange(small_clusters)}", f"node-{rng.randrange(5)}"
            await stub.AffiliateUpdate(request(cluster, aid, k), timeout=30)
            done += 1

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bench(args: argparse.Namespace, port: int, pid: int) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    stubs = [pbg.ClusterStub(ch) for ch in channels]
    t0 = time.monotonic()
    n = await seed(stubs, args.small_clusters)
    took = time.monotonic() - t0
    print(
        f"seeded {n} affiliates (1024 in one cluster + {args.small_clusters} x 5) in {took:.1f} s "
        f"({n / took:.0f} updates/s, no watchers)"
    )

    watchers = [Watcher(stubs[i % len(stubs)]) for i in range(args.watchers)]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 60)
    print(f"{args.watchers} watchers on the 1024-affiliate cluster; RSS {proc_status(pid)}")

    cpu0, me0, t0 = proc_cpu(pid), time.process_time(), time.monotonic()
    msgs0 = sum(w.messages for w in watchers)
    done = await hammer(stubs, args.duration, args.concurrency, args.small_clusters, None)
    wall = time.monotonic() - t0
    msgs = sum(w.messages for w in watchers) - msgs0
    print(
        f"throughput: {done / wall:.0f} updates/s sustained over {wall:.1f} s "
        f"({args.concurrency} concurrent callers); {msgs / wall:.0f} watch messages/s delivered; "
        f"watch overflows (ABORTED, reconnected): {sum(w.aborted for w in watchers)}"
    )
    print(
        f"  CPU: service {100 * (proc_cpu(pid) - cpu0) / wall:.0f}%, load generator "
        f"{100 * (time.process_time() - me0) / wall:.0f}% of one core"
    )

    await asyncio.sleep(1.0)  # drain
    for w in watchers:
        w.record = True
    aborted0 = sum(w.aborted for w in watchers)
    done = await hammer(
        stubs, args.duration, min(args.concurrency, 16), args.small_clusters, args.paced_rate
    )
    await asyncio.sleep(1.0)
    lat = [x for w in watchers for x in w.latencies]
    print(
        f"fan-out latency at {args.paced_rate:.0f} updates/s paced ({done} updates, "
        f"{len(lat)} deliveries to {args.watchers} watchers): "
        f"p50 {1000 * pct(lat, 0.50):.1f} ms, p99 {1000 * pct(lat, 0.99):.1f} ms, "
        f"max {1000 * max(lat, default=float('nan')):.1f} ms; "
        f"overflows {sum(w.aborted for w in watchers) - aborted0}"
    )
    st = proc_status(pid)
    print(f"server RSS {st['VmRSS'] / 1024:.1f} MiB (peak {st['VmHWM'] / 1024:.1f} MiB)")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--watchers", type=int, default=32)
    p.add_argument("--small-clusters", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--paced-rate", type=float, default=200.0)
    args = p.parse_args()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control.discovery",
            "--listen",
            "127.0.0.1:0",
            "--rate",
            "1e9",
            "--burst",
            "1000000000",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    try:
        line = server.stdout.readline()
        m = re.search(r":(\d+)$", line.strip())
        if not m:
            raise SystemExit(f"service did not start: {line!r}")
        asyncio.run(
            asyncio.wait_for(bench(args, int(m.group(1)), server.pid), 10 * args.duration + 120)
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
