"""One measurement each: iperf3 TCP/UDP throughput, ping RTT.  Results are plain
numbers; the caller repeats and takes medians."""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass

from control.netlab import Netns, stop_processes, wait_until

IPERF_PORT = 5201


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat (idle and iowait are
    not busy)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - fields[3] - fields[4], total


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of all CPUs that were busy between two cpu_times() samples."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


@dataclass
class IperfResult:
    value: float  # bits/s (tcp) or received packets/s (udp)
    bytes: int  # bytes that reached the receiver


class IperfServer:
    """A long-lived iperf3 server in the receiving namespace."""

    def __init__(self, ns: Netns, addr: str) -> None:
        self.ns, self.addr = ns, addr
        self.proc = ns.popen(["iperf3", "-s", "-B", addr, "-p", str(IPERF_PORT)])
        wait_until(self._listening, 10, 0.05, "iperf3 server")

    def _listening(self) -> bool:
        out = self.ns.run("ss", "-Htln", f"sport = :{IPERF_PORT}", check=False).stdout
        return bool(out.strip())

    def close(self) -> None:
        stop_processes([self.proc])


def _iperf(ns: Netns, server: str, args: list[str], duration: float) -> dict:
    cmd = ["iperf3", "-c", server, "-p", str(IPERF_PORT), "-J", "-t", str(duration), *args]
    for attempt in range(3):
        proc = ns.run(*cmd, check=False, timeout=duration + 60)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            data = {"error": proc.stderr or "no output"}
        if "error" not in data:
            return data
        # "the server is busy" right after the previous run: give it a moment.
        time.sleep(1 + attempt)
    raise RuntimeError(f"iperf3 failed: {data['error']}")


def tcp(ns: Netns, server: str, duration: float, streams: int) -> IperfResult:
    data = _iperf(ns, server, ["-P", str(streams)], duration)
    recv = data["end"]["sum_received"]
    return IperfResult(recv["bits_per_second"], int(recv["bytes"]))


def udp_pps(ns: Netns, server: str, duration: float, payload: int) -> IperfResult:
    """Unlimited-rate UDP flood; packets/s that arrived (lost ones excluded)."""
    data = _iperf(ns, server, ["-u", "-b", "0", "-l", str(payload)], duration)
    s = data["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return IperfResult(received / s["seconds"], received * payload)


_RTT = re.compile(r"time=([0-9.]+) ms")


def ping_rtt_ms(ns: Netns, addr: str, count: int = 40) -> float:
    """Median RTT of ``count`` pings 20 ms apart on an otherwise idle tunnel."""
    out = ns.run(
        "ping", "-n", "-c", str(count), "-i", "0.02", addr, check=False, timeout=count + 30
    ).stdout
    rtts = [float(m) for m in _RTT.findall(out)]
    if len(rtts) < count // 2:
        raise RuntimeError(f"ping lost too many packets ({len(rtts)}/{count})")
    return statistics.median(rtts)
