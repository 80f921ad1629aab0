"""Private valkey-servers for tests: one on a unix socket or on 127.0.0.1:PORT, or a
three-node Valkey Cluster on 127.0.0.1."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


class ValkeyProcess:
    """``port=0``: unix socket only (no TCP listener at all). ``persist``: append-only
    file in ``workdir``, so a restart (even after SIGKILL) comes back with the data."""

    def __init__(
        self, workdir: Path, port: int = 0, persist: bool = False, extra: tuple[str, ...] = ()
    ) -> None:
        binary = shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("valkey-server is not installed (scripts/bootstrap.sh does it)")
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.persist = persist
        self.extra = extra
        self.socket = workdir / "valkey.sock"
        self.logfile = workdir / "valkey.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10)

    def start(self, timeout: float = 30.0) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.logfile),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited: {self._log_tail()}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"valkey-server not ready in {timeout} s: {self._log_tail()}")
            time.sleep(0.02)

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

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def _log_tail(self) -> str:
        try:
            return self.logfile.read_text()[-2000:]
        except OSError:
            return "(no log)"


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


class ValkeyCluster:
    """Three masters, no replicas, the 16384 slots split between them."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.nodes = []
        for i in range(nodes):
            d = workdir / f"node{i}"
            d.mkdir()
            self.nodes.append(
                ValkeyProcess(
                    d,
                    port=_cluster_port(),
                    extra=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(d / "nodes.conf"),
                    ),
                )
            )

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("valkey-cli")
        if cli is None:
            raise RuntimeError("valkey-cli is not installed (valkey-tools, with valkey-server)")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Valkey Cluster never reached cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(node: ValkeyProcess) -> bool:
        with node.client() as c:
            info = c.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
