"""The benchmark: two namespaces over veth, several ways to join them, same measurements.

    .venv/bin/python -m bench [--repeats N] [--duration S] [--only a,b,...]

(a) plain veth, (b) wireguard-go <-> wireguard-go, (c) ours <-> ours,
(d) ours <-> wireguard-go; on request (e) the old wireguard-go on both ends.
"wireguard-go" is the modern one (bookworm-backports: UDP GSO/GRO, TUN offloads),
the anchor; "wggo-old" is bookworm's 0.0.20220316 (scripts/bootstrap.sh installs
both; the versions measured are printed, and recorded in the JSON).  For each: iperf3
TCP 1 and 4 streams, UDP packets/s with 1420-byte IP packets and with 64-byte payloads,
idle ping RTT, and CPU seconds of the WireGuard processes per GB moved (during the TCP
1-stream runs).  The scenarios take turns: each round sets up and measures every
one of them once, in fresh namespaces.  Each figure is the median of ``--repeats``
rounds; the table shows ratios to (b).  JSON and a PNG chart go to bench/results/.
Every address used lives inside the namespaces this run creates.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench import measure, report
from bench.wireguard import (
    WGGO,
    Endpoint,
    Unavailable,
    configure_pair,
    ping_ok,
    start,
    wggo_build,
)
from control.netlab import Lab, add_address

RESULTS = Path(__file__).resolve().parent / "results"
OUTER_A, OUTER_B = "192.168.241.1", "192.168.241.2"
INNER_A, INNER_B = "10.241.0.1", "10.241.0.2"
# UDP payload that makes a full 1420-byte inner IPv4 packet (20 IP + 8 UDP header).
UDP_FULL_PAYLOAD = 1420 - 28

SCENARIOS = {
    "a": ("plain veth", None, None),
    "b": ("wireguard-go <-> wireguard-go", "wireguard-go", "wireguard-go"),
    "c": ("ours <-> ours", "ours", "ours"),
    "d": ("ours <-> wireguard-go", "ours", "wireguard-go"),
    "e": ("wggo-old <-> wggo-old", "wireguard-go-old", "wireguard-go-old"),
}
DEFAULT = "a,b,c,d"
Samples = dict[str, list[float]]


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure_once(key: str, tag: str, duration: float, logdir: Path, samples: Samples) -> None:
    """Set scenario KEY up in fresh namespaces, take every measurement once into
    `samples`, tear it down."""
    label, impl_a, impl_b = SCENARIOS[key]
    lab = Lab("ksb")
    try:
        ns_a, ns_b = lab.netns("a"), lab.netns("b")
        va, vb = lab.veth(ns_a, ns_b)
        add_address(ns_a, va, OUTER_A + "/24")
        add_address(ns_b, vb, OUTER_B + "/24")
        eps: list[Endpoint] = []
        target = OUTER_B
        if impl_a is not None and impl_b is not None:
            eps = [
                start(lab, impl_a, ns_a, INNER_A, logdir),
                start(lab, impl_b, ns_b, INNER_B, logdir),
            ]
            configure_pair(eps[0], eps[1], OUTER_A, OUTER_B)
            target = INNER_B
        deadline = time.monotonic() + 30
        while not ping_ok(ns_a, target):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ping through {label} within 30 s")
        server = measure.IperfServer(ns_b, target)
        cpu0, busy0 = sum(e.cpu() for e in eps), measure.cpu_times()
        r = measure.tcp(ns_a, target, duration, 1)
        cpu = sum(e.cpu() for e in eps) - cpu0
        samples["busy_tcp1"].append(measure.busy_fraction(busy0, measure.cpu_times()))
        samples["tcp1"].append(r.value)
        if eps:
            samples["cpu_per_gb"].append(cpu / (r.bytes / 1e9))
        progress(
            f"{tag} TCP 1 stream {r.value / 1e9:.2f} Gbit/s"
            + (f", {cpu / (r.bytes / 1e9):.2f} CPU s/GB" if eps else "")
        )
        busy0 = measure.cpu_times()
        r = measure.tcp(ns_a, target, duration, 4)
        samples["busy_tcp4"].append(measure.busy_fraction(busy0, measure.cpu_times()))
        samples["tcp4"].append(r.value)
        progress(f"{tag} TCP 4 streams {r.value / 1e9:.2f} Gbit/s")
        r = measure.udp_pps(ns_a, target, duration, UDP_FULL_PAYLOAD)
        samples["udp1420"].append(r.value)
        progress(f"{tag} UDP 1420 B packets {r.value / 1e3:.1f} kpps")
        r = measure.udp_pps(ns_a, target, duration, 64)
        samples["udp64"].append(r.value)
        progress(f"{tag} UDP 64 B payload {r.value / 1e3:.1f} kpps")
        rtt = measure.ping_rtt_ms(ns_a, target)
        samples["ping"].append(rtt)
        progress(f"{tag} ping {rtt:.3f} ms")
        server.close()
    finally:
        lab.close()


def run_scenarios(keys: list[str], repeats: int, duration: float, logdir: Path) -> dict:
    """Every scenario once per round, `repeats` rounds: a slow patch of the machine
    (another process, thermal, the host of this VM) lands on all of them alike instead
    of on whichever scenario ran at the time."""
    samples: dict[str, Samples] = {k: {m: [] for m in report.METRICS} for k in keys}
    outcome: dict[str, dict] = {}
    for rep in range(1, repeats + 1):
        for key in keys:
            if key in outcome:  # unavailable or failed: not tried again
                continue
            label = SCENARIOS[key][0]
            try:
                measure_once(
                    key, f"{key}) {label} [{rep}/{repeats}]", duration, logdir, samples[key]
                )
            except Unavailable as e:
                progress(f"{key}) {label}: unavailable: {e}")
                outcome[key] = {"label": label, "status": "unavailable", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - one broken scenario must not sink the run
                progress(f"{key}) {label}: failed: {e}")
                outcome[key] = {
                    "label": label,
                    "status": "failed",
                    "reason": f"{type(e).__name__}: {e}",
                }
    for key in keys:
        if key not in outcome:
            metrics = {
                m: {"median": statistics.median(v), "samples": v}
                for m, v in samples[key].items()
                if v
            }
            outcome[key] = {"label": SCENARIOS[key][0], "status": "ok", "metrics": metrics}
    return {k: outcome[k] for k in keys}


def wireguard_go_builds(keys: list[str]) -> dict[str, dict[str, str]]:
    """Which wireguard-go each implementation these scenarios use is (path, version)."""
    builds: dict[str, dict[str, str]] = {}
    impls = {impl for k in keys for impl in SCENARIOS[k][1:] if impl in WGGO}
    for impl in sorted(impls):
        try:
            b = wggo_build(impl)
        except Unavailable as e:
            builds[impl] = {"missing": str(e)}
            continue
        builds[impl] = {
            "flavour": b.flavour,
            "path": str(b.path),
            "version": b.version,
            "package": b.package,
        }
        progress(f"{impl}: {b.describe()} at {b.path}")
    return builds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per iperf3 run")
    p.add_argument("--only", default=DEFAULT, help=f"comma-separated scenarios (default {DEFAULT})")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in SCENARIOS]
    if bad or args.repeats < 1 or args.duration <= 0:
        p.error(f"bad arguments: unknown scenarios {bad}" if bad else "bad repeats/duration")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = args.out / f"logs-{stamp}"
    logdir.mkdir()
    scenarios: dict[str, dict] = {}
    builds = wireguard_go_builds(keys)
    results: dict[str, object] = {
        "timestamp": stamp,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "config": {
            "repeats": args.repeats,
            "duration_s": args.duration,
            "udp_full_payload": UDP_FULL_PAYLOAD,
        },
        "wireguard_go": builds,
        "scenarios": scenarios,
    }
    progress(f"{args.repeats} rounds of: " + ", ".join(f"{k}) {SCENARIOS[k][0]}" for k in keys))
    scenarios.update(run_scenarios(keys, args.repeats, args.duration, logdir))
    results["ratios_to_b"] = report.ratios(results)
    print(report.table(results))
    jpath = args.out / f"bench-{stamp}.json"
    report.save_json(results, jpath)
    png = args.out / f"bench-{stamp}.png"
    drew = report.chart(results, png)
    print(f"JSON: {jpath}" + (f"\nchart: {png}" if drew else "\nchart: matplotlib missing"))
    return 0 if all(s["status"] != "failed" for s in scenarios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
