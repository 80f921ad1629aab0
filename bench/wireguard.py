"""Bring up a WireGuard pair across two namespaces with a chosen implementation.

Implementations: "wireguard-go" (the modern one with offloads, from bookworm-backports),
"wireguard-go-old" (bookworm's 0.0.20220316; control.netlab.wggo finds both) and
"ours" (`kubespan-wg`, our daemon). All are configured the same way, through their
UAPI socket with stock `wg`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.netlab import Lab, Netns, run, stop_processes, unique_name, wait_until, wggo
from kubespan_dp.uapisock import socket_path

REPO = Path(__file__).resolve().parents[1]
MTU = 1420
PORT = 51820


class Unavailable(Exception):
    """This implementation cannot run here (e.g. our daemon not built yet)."""


# implementation -> control.netlab.wggo flavour
WGGO = {"wireguard-go": "modern", "wireguard-go-old": "old"}


def wggo_build(impl: str) -> wggo.WireguardGo:
    try:
        return wggo.find(WGGO[impl])
    except wggo.Missing as e:
        raise Unavailable(str(e)) from None


def daemon_command(impl: str, ifname: str) -> list[str]:
    if impl in WGGO:
        return [str(wggo_build(impl).path), "-f", ifname]
    if impl == "ours":
        venv_exe = REPO / ".venv" / "bin" / "kubespan-wg"
        try:
            import kubespan_dp.cli  # noqa: F401
            import kubespan_dp.device  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not there"
            raise Unavailable(f"our daemon is not importable: {e}") from None
        if venv_exe.exists():
            return [str(venv_exe), "-f", ifname]
        return [sys.executable, "-m", "kubespan_dp.cli", "-f", ifname]
    raise ValueError(impl)


@dataclass
class Endpoint:
    ns: Netns
    ifname: str
    proc: subprocess.Popen[Any]
    inner: str  # tunnel address without prefix length

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total


def start(lab: Lab, impl: str, ns: Netns, inner: str, logdir: Path) -> Endpoint:
    ifname = unique_name("ksb", 8)
    cmd = daemon_command(impl, ifname)
    sock = socket_path(ifname)
    lab.defer(lambda: sock.unlink(missing_ok=True))  # after the daemon: a killed one leaves it
    # ours: the C packet loop (KUBESPAN_WG_FASTPATH=1), the configuration under test
    env = {"LOG_LEVEL": "error", "KUBESPAN_WG_FASTPATH": "1"}
    proc = ns.popen(cmd, env=env, log=logdir / f"{impl}-{ifname}.log")
    lab.defer(lambda: stop_processes([proc]))
    try:
        wait_until(
            lambda: sock.exists() or proc.poll() is not None, 15, 0.05, f"{impl} UAPI socket"
        )
    except TimeoutError:
        raise Unavailable(f"{impl} did not open its UAPI socket within 15 s") from None
    if proc.poll() is not None:
        raise Unavailable(f"{impl} exited with {proc.returncode} (log in {logdir})")
    ns.run("ip", "link", "set", ifname, "mtu", str(MTU))
    ns.run("ip", "addr", "add", inner + "/24", "dev", ifname)
    ns.run("ip", "link", "set", ifname, "up")
    return Endpoint(ns, ifname, proc, inner)


def configure_pair(a: Endpoint, b: Endpoint, outer_a: str, outer_b: str) -> None:
    keys = {}
    for ep in (a, b):
        priv = run(["wg", "genkey"]).stdout.strip()
        pub = run(["wg", "pubkey"], input=priv + "\n").stdout.strip()
        keys[ep.ifname] = (priv, pub)
    for me, other, their_outer in ((a, b, outer_b), (b, a, outer_a)):
        priv, _ = keys[me.ifname]
        _, their_pub = keys[other.ifname]
        me.ns.run(
            "wg",
            "set",
            me.ifname,
            "listen-port",
            str(PORT),
            "private-key",
            "/dev/stdin",
            "peer",
            their_pub,
            "endpoint",
            f"{their_outer}:{PORT}",
            "allowed-ips",
            other.inner + "/32",
            input=priv + "\n",
        )


def ping_ok(ns: Netns, addr: str) -> bool:
    return ns.run("ping", "-c", "1", "-W", "1", addr, check=False).returncode == 0


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
