"""A private valkey-server for tests: on a unix socket, or on 127.0.0.1:PORT."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis


class ValkeyProcess:
    """``port=0``: unix socket only (no TCP listener at all). ``persist``: append-only
    file in ``workdir``, so a restart (even after SIGKILL) comes back with the data."""

    def __init__(self, workdir: Path, port: int = 0, persist: bool = False) -> None:
        binary = shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("valkey-server is not installed (scripts/bootstrap.sh does it)")
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.persist = persist
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
