"""Namespaces, veth and daemons for the benchmark, all torn down by `Lab.close()`.

Everything carries a random suffix; nothing gets a route out of the namespaces.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

WG_RUN_DIR = Path("/var/run/wireguard")


def suffix(n: int = 5) -> str:
    return secrets.token_hex(n)[:n]


def run(
    *args: str,
    ns: str | None = None,
    check: bool = True,
    timeout: float = 60,
    input: bytes | None = None,
) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, check=check, timeout=timeout, input=input)


class Lab:
    """Owns namespaces, processes and socket files; `close()` removes them all."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.sockets: list[Path] = []

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{suffix()}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def veth(self, ns_a: str, ns_b: str, addr_a: str, addr_b: str) -> tuple[str, str]:
        a, b = f"vb{suffix()}a", f"vb{suffix()}b"
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            run("ip", "addr", "add", addr, "dev", dev, ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)
        return a, b

    def spawn(
        self, args: list[str], ns: str, env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        for sock in self.sockets:
            sock.unlink(missing_ok=True)
        self.procs.clear()
        self.namespaces.clear()


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The process and its children (our `ip netns exec` wrapper execs, so the
    daemon usually is the pid itself; a daemonizing one would be a child)."""
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += descendants(int(k))
    return out
