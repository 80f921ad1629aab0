"""Turn medians into the printed table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

# metric key -> (label, unit, scale from raw, higher_is_better)
METRICS: dict[str, tuple[str, str, float, bool]] = {
    "tcp1": ("TCP 1 stream", "Gbit/s", 1e-9, True),
    "tcp4": ("TCP 4 streams", "Gbit/s", 1e-9, True),
    "udp1420": ("UDP 1420 B packets", "kpps", 1e-3, True),
    "udp64": ("UDP 64 B payload", "kpps", 1e-3, True),
    "ping": ("ping RTT idle", "ms", 1.0, False),
    "cpu_per_gb": ("CPU per GB (TCP 1)", "s/GB", 1.0, False),
    "busy_tcp1": ("machine busy (TCP 1)", "%", 100.0, False),
    "busy_tcp4": ("machine busy (TCP 4)", "%", 100.0, False),
}
# Context, not a result: how much of all CPUs the machine used during the TCP runs
# (near 100% means the CPUs, not the code path, bound the throughput). Not charted.
CONTEXT_METRICS = {"busy_tcp1", "busy_tcp4"}
BASE = "b"


def ratios(results: dict) -> dict[str, dict[str, float]]:
    base = results["scenarios"].get(BASE, {}).get("metrics", {})
    out: dict[str, dict[str, float]] = {}
    for key, sc in results["scenarios"].items():
        for m, v in sc.get("metrics", {}).items():
            b = base.get(m, {}).get("median")
            if b and v.get("median") is not None:
                out.setdefault(key, {})[m] = v["median"] / b
    return out


def table(results: dict) -> str:
    scen = results["scenarios"]
    rat = results.get("ratios_to_b", {})
    keys = list(scen)
    head = f"{'metric':<26}" + "".join(f" {k + ') ' + scen[k]['label']:>31}" for k in keys)
    lines = [head, "-" * len(head)]
    for m, (label, unit, scale, _) in METRICS.items():
        row = f"{label + ' [' + unit + ']':<26}"
        for k in keys:
            sc = scen[k]
            if sc["status"] != "ok":
                cell = sc["status"]
            else:
                v = sc["metrics"].get(m, {}).get("median")
                if v is None:
                    cell = "n/a"
                else:
                    r = None if m in CONTEXT_METRICS else rat.get(k, {}).get(m)
                    cell = f"{v * scale:.3g}" + (f" ({r:.2f}x)" if r is not None else "")
            row += f" {cell:>31}"
        lines.append(row)
    lines.append("ratios are to b); higher is better except ping RTT and CPU per GB")
    for impl, build in results.get("wireguard_go", {}).items():
        lines.append(f"{impl}: {describe(build)}")
    for k in keys:
        if scen[k]["status"] != "ok":
            lines.append(f"{k}) {scen[k]['status']}: {scen[k].get('reason', '')}")
    return "\n".join(lines)


def describe(build: dict[str, str]) -> str:
    """One wireguard-go build as recorded by the run: version, package, path."""
    if "missing" in build:
        return f"missing ({build['missing']})"
    pkg = f" (Debian {build['package']})" if build.get("package") else ""
    return f"{build['version']}{pkg} [{build['flavour']}] {build['path']}"


def save_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def chart(results: dict, path: Path) -> bool:
    """Grouped bars of each scenario's ratio to (b).  False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rat = results["ratios_to_b"]
    keys = [k for k, sc in results["scenarios"].items() if sc["status"] == "ok"]
    metrics = [m for m in METRICS if m not in CONTEXT_METRICS]
    width = 0.8 / max(1, len(keys))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, k in enumerate(keys):
        xs = [j + i * width for j in range(len(metrics))]
        ys = [rat.get(k, {}).get(m, float("nan")) for m in metrics]
        ax.bar(xs, ys, width, label=f"{k}) {results['scenarios'][k]['label']}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")  # plain veth is tens of times the tunnels
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels(
        [METRICS[m][0] + ("\n(lower better)" if not METRICS[m][3] else "") for m in metrics],
        fontsize=8,
    )
    ax.set_ylabel("ratio to b) wireguard-go <-> wireguard-go")
    anchor = results.get("wireguard_go", {}).get("wireguard-go", {})
    measured = f", wireguard-go {describe(anchor).split(' [')[0]}" if anchor else ""
    ax.set_title(f"kubespan-py benchmark {results['timestamp']}{measured}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
