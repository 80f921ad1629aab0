"""High availability for real: Valkey, three replicas and HAProxy, 20 discovery clients.

Every process is a real one on its own port on 127.0.0.1: valkey-server (append-only
file, so its restart keeps the state), three ``python -m control.discovery --store``
replicas, and HAProxy running deploy/haproxy.cfg with the test's addresses swapped in.
The clients connect through HAProxy only. Then:

1. ``kill -9`` the replica with the most watchers: its watchers reconnect (their backoff)
   through HAProxy to the others, and every client again has every other affiliate;
2. restart Valkey: every replica recovers by itself, every client reconnects;
3. rolling restart of all three replicas (drain in HAProxy, SIGTERM, start, wait UP).

Clients keep nothing over a reconnect (``reconnect_grace=0``): what they show is what the
service sent, and after the first convergence no client's set may ever shrink. The
timings of each step are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.discovery.client import Backoff, DiscoveryClient
from tests.control.discovery.valkeyproc import ValkeyProcess

from .conftest import make_affiliate, new_secret, run

REPO = Path(__file__).resolve().parents[3]
TEMPLATE = REPO / "deploy" / "haproxy.cfg"
CLIENTS = 20
CLUSTER = "ha"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def haproxy_config(template: str, listen: str, servers: dict[str, int], stats: Path) -> str:
    """deploy/haproxy.cfg with its bind address, servers and admin socket replaced."""
    text = re.sub(r"(?m)^(\s*bind )\S+", rf"\g<1>{listen}", template)
    text = re.sub(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{stats}", text)
    lines = [ln for ln in text.splitlines() if not re.match(r"\s*server ", ln)]
    lines += [f"    server {name} 127.0.0.1:{port}" for name, port in servers.items()]
    return "\n".join(lines) + "\n"


class Replica:
    def __init__(self, name: str, store_url: str, logdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.store_url = store_url
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            sys.executable, "-m", "control.discovery",
            "--listen", f"127.0.0.1:{self.port}",
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            "--store", self.store_url,
            "--gc-interval", "5",
            # Behind TCP-mode HAProxy every client comes from the proxy's address.
            "--ip-rate", "10000", "--ip-burst", "20000",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        wait_until(
            lambda: self._alive() and port_open(self.port) and port_open(self.metrics_port),
            f"{self.name} listening",
        )

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def watchers(self) -> int:
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "discovery_state_subscriptions":
                return int(family.samples[0].value)
        raise AssertionError("no discovery_state_subscriptions metric")


class HAProxy:
    def __init__(self, workdir: Path, servers: dict[str, int]) -> None:
        self.port = free_port()
        self.stats = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            haproxy_config(TEMPLATE.read_text(), f"127.0.0.1:{self.port}", servers, self.stats)
        )
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {self.log.read_text()[-2000:]}")
            return port_open(self.port) and self.stats.exists()

        wait_until(up, "haproxy listening")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def status(self, server: str) -> str:
        for row in self.command("show stat").splitlines():
            fields = row.split(",")
            if len(fields) > 17 and fields[0] == "replicas" and fields[1] == server:
                return fields[17]  # "status": UP, DOWN, DRAIN, "UP 1/2", ...
        raise AssertionError(f"haproxy does not know {server}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[ValkeyProcess, dict[str, Replica], HAProxy]]:
    valkey = ValkeyProcess(tmp_path, port=free_port(), persist=True)
    replicas = {f"replica{i}": Replica(f"replica{i}", valkey.url, tmp_path) for i in (1, 2, 3)}
    proxy = HAProxy(tmp_path, {name: r.port for name, r in replicas.items()})
    try:
        valkey.start()
        for r in replicas.values():
            r.start()
        proxy.start()
        wait_until(
            lambda: all(proxy.status(n) == "UP" for n in replicas), "haproxy sees replicas UP"
        )
        yield valkey, replicas, proxy
    finally:
        proxy.stop()
        for r in replicas.values():
            r.stop(signal.SIGKILL)
        valkey.stop()


class Fleet:
    """The clients, and the smallest set any of them showed since they converged."""

    def __init__(self, port: int) -> None:
        secret = new_secret()
        self.names = [f"node{i:02d}" for i in range(CLIENTS)]
        self.clients = [
            DiscoveryClient(
                f"127.0.0.1:{port}",
                CLUSTER,
                secret,
                name,
                insecure=True,
                reconnect_grace=0,  # show exactly what the service sends
                backoff=Backoff(),  # the default a real agent has: 0.5 s, x1.5, jitter
            )
            for name in self.names
        ]
        self.converged = False
        self.smallest = CLIENTS - 1
        for i, c in enumerate(self.clients):
            c.set_local(make_affiliate(c.affiliate_id, i + 1))
            c.on_change = self._watch_size

    def _watch_size(self, table: dict) -> None:
        if self.converged:
            self.smallest = min(self.smallest, len(table))

    def complete(self) -> bool:
        return all(
            c.connected and set(c.affiliates) == set(self.names) - {c.affiliate_id}
            for c in self.clients
        )

    def failures(self) -> int:
        return sum(c.failed_sessions for c in self.clients)

    async def until(self, predicate, what: str, timeout: float = 90.0) -> float:
        """Seconds until ``predicate()`` holds (polled; the clients run meanwhile)."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"never happened within {timeout} s: {what}")
            await asyncio.sleep(0.02)
        return time.monotonic() - start


def test_replicas_on_valkey_behind_haproxy_survive_kills_and_restarts(stack):
    valkey, replicas, proxy = stack
    timings: dict[str, float] = {}

    async def off_loop(fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def main() -> None:
        fleet = Fleet(proxy.port)
        t0 = time.monotonic()
        for c in fleet.clients:
            c.start()
        try:
            timings["converge"] = await fleet.until(fleet.complete, "first convergence")
            fleet.converged = True
            assert fleet.failures() == 0
            counts = {n: await off_loop(r.watchers) for n, r in replicas.items()}
            assert sum(counts.values()) == CLIENTS, counts

            # 1. kill -9 the busiest replica.
            victim = max(counts, key=lambda n: counts[n])
            failed_before = fleet.failures()
            t = time.monotonic()
            replicas[victim].stop(signal.SIGKILL)
            await fleet.until(
                lambda: fleet.failures() >= failed_before + counts[victim], "victims noticed"
            )
            timings["kill_noticed"] = time.monotonic() - t
            await fleet.until(fleet.complete, "complete after the kill")
            timings["kill_recovered"] = time.monotonic() - t
            # Each of its watchers reconnected at its first retry; nobody else noticed.
            assert fleet.failures() == failed_before + counts[victim]
            others = [r for n, r in replicas.items() if n != victim]
            assert sum([await off_loop(r.watchers) for r in others]) == CLIENTS
            await off_loop(replicas[victim].start)
            await fleet.until(lambda: proxy.status(victim) == "UP", f"{victim} UP again")
            timings["kill_replica_back_up"] = time.monotonic() - t

            # 2. Restart Valkey under everyone.
            failed_before = fleet.failures()
            t = time.monotonic()
            await off_loop(valkey.stop)
            timings["valkey_stop"] = time.monotonic() - t
            await fleet.until(lambda: fleet.failures() > failed_before, "clients noticed")
            await off_loop(valkey.start)
            timings["valkey_down"] = time.monotonic() - t
            await fleet.until(
                lambda: fleet.failures() >= failed_before + CLIENTS, "every watch ended"
            )
            await fleet.until(fleet.complete, "complete after the Valkey restart")
            timings["valkey_recovered"] = time.monotonic() - t

            # 3. Rolling restart: drain, SIGTERM, start, wait UP; one replica at a time.
            t = time.monotonic()
            for name, r in replicas.items():
                proxy.command(f"set server replicas/{name} state drain")
                await off_loop(r.stop)
                await off_loop(r.start)
                proxy.command(f"set server replicas/{name} state ready")
                await fleet.until(lambda n=name: proxy.status(n) == "UP", f"{name} UP")
                await fleet.until(fleet.complete, f"complete after restarting {name}")
            timings["rolling_restart"] = time.monotonic() - t
            timings["total"] = time.monotonic() - t0

            # Nothing was lost at any moment, and the service agrees.
            assert fleet.smallest == CLIENTS - 1, fleet.smallest
            for c in fleet.clients:
                assert c.affiliates == {
                    other.affiliate_id: make_affiliate(other.affiliate_id, i + 1)
                    for i, other in enumerate(fleet.clients)
                    if other is not c
                }
            counts = {n: await off_loop(r.watchers) for n, r in replicas.items()}
            assert sum(counts.values()) == CLIENTS, counts
        finally:
            for c in fleet.clients:
                await c.close(leave=False)

    run(main(), timeout=600)
    print("\nHA timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
