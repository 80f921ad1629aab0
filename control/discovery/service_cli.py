"""`kubespan discovery-service`: run the discovery service until SIGINT/SIGTERM.

On a signal the service reports NOT_SERVING (gRPC health), stops accepting calls, gives
running ones --shutdown-grace seconds, ends watches, and writes its snapshot before exiting.

State is snapshotted by default to ``discovery.binpb`` in the state directory
(``--state-dir``; default: systemd's $STATE_DIRECTORY, else /var/lib/kubespan/discovery for
root, else $XDG_STATE_HOME/kubespan/discovery) and restored from it at start. With
--store redis://... the state lives in Valkey instead (no snapshot: --no-snapshot is
implied), and any number of these processes serve it (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from ipaddress import ip_network
from pathlib import Path

from control.discovery.server import DiscoveryServer, ServerOptions
from control.discovery.state import Limits

SNAPSHOT_FILE = "discovery.binpb"
_LIMIT_HELP = {
    "cluster_id_max": "longest cluster ID, bytes",
    "affiliate_id_max": "longest affiliate ID, bytes",
    "affiliate_data_max": "largest affiliate data, bytes",
    "endpoint_max": "largest endpoint, bytes",
    "endpoints_per_affiliate": "endpoints per affiliate",
    "affiliates_per_cluster": "affiliates per cluster",
    "ttl_max": "longest TTL, seconds",
    "clusters_max": "clusters in the service",
    "subscriptions_max": "watches in the service",
    "watch_buffer": "changes queued for one watch before it is aborted",
}


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/kubespan/discovery")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kubespan" / "discovery"


def snapshot_path(ns: argparse.Namespace) -> str | None:
    """Where the in-memory state is snapshotted (None: nowhere)."""
    if ns.no_snapshot or getattr(ns, "store", None):  # a shared store persists itself
        return None
    if ns.snapshot_path:
        return str(ns.snapshot_path)
    state_dir = Path(ns.state_dir) if ns.state_dir else default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(state_dir / SNAPSHOT_FILE)


def limits_from_args(ns: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(ns, f"limit_{f.name}") for f in dataclasses.fields(Limits)})


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _network(text: str) -> str:
    try:
        return str(ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an address or CIDR, got {text!r}") from None


def build_parser(prog: str = "kubespan discovery-service") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a KubeSpan discovery service (Sidero discovery API).",
        epilog="The state snapshot goes to --snapshot-path, else to "
        f"--state-dir/{SNAPSHOT_FILE}; the state directory defaults to $STATE_DIRECTORY "
        "(systemd), else /var/lib/kubespan/discovery as root, else "
        "$XDG_STATE_HOME/kubespan/discovery.",
    )
    p.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", 3000),
        metavar="HOST:PORT",
        help="gRPC listen address (default 127.0.0.1:3000)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate; with --tls-key serves TLS instead of h2c",
    )
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument(
        "--redirect-endpoint",
        default="",
        metavar="ENDPOINT",
        help="tell every client (in Hello) to use this endpoint instead",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"where the state snapshot ({SNAPSHOT_FILE}) lives (default: see below)",
    )
    p.add_argument(
        "--snapshot-path", metavar="FILE", help="snapshot file (default: in --state-dir)"
    )
    p.add_argument(
        "--no-snapshot", action="store_true", help="keep state in memory only, never on disk"
    )
    p.add_argument(
        "--store",
        metavar="URL",
        help="keep the state in Valkey/Redis (redis://HOST:PORT/DB, rediss://..., "
        "unix://PATH?db=N), shared with other replicas; default: in this process",
    )
    p.add_argument(
        "--store-cluster",
        action="store_true",
        help="the --store URL names one node of a Valkey Cluster (redis:// or rediss://)",
    )
    p.add_argument("--snapshot-interval", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--gc-interval", type=float, default=60.0, metavar="SECONDS")
    p.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        type=_network,
        metavar="CIDR",
        help="take the client address from X-Real-IP / X-Forwarded-For on calls from "
        "this network (a proxy in front of the service); repeatable",
    )
    p.add_argument(
        "--disable-client-ip", action="store_true", help="do not echo client addresses in Hello"
    )
    p.add_argument(
        "--rate", type=float, default=15.0, help="requests per second per client connection"
    )
    p.add_argument("--burst", type=int, default=60, help="burst size per client connection")
    p.add_argument(
        "--ip-rate",
        type=float,
        default=256.0,
        help="requests per second per client address, all its connections together "
        "(a whole cluster behind one NAT)",
    )
    p.add_argument("--ip-burst", type=int, default=4096, help="burst size per client address")
    p.add_argument("--log-requests", action="store_true", help="log one JSON line per request")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running calls may take to finish (default 1)",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=ServerOptions.max_streams_per_connection,
        metavar="N",
        help="HTTP/2 streams one client connection may have open at once",
    )
    p.add_argument(
        "--watch-messages-per-second",
        type=float,
        default=ServerOptions.watch_messages_per_second,
        metavar="N",
        help="all watches together (every replica's, on a shared store) send about this "
        "many change messages a second (changes batch up meanwhile)",
    )
    limits = p.add_argument_group("limits")
    for f in dataclasses.fields(Limits):
        limits.add_argument(
            f"--limit-{f.name.replace('_', '-')}",
            dest=f"limit_{f.name}",
            type=type(f.default),
            default=f.default,
            metavar="N",
            help=f"{_LIMIT_HELP[f.name]} (default {f.default:g})",
        )
    return p


async def _serve(ns: argparse.Namespace) -> None:
    opts = ServerOptions(
        redirect_endpoint=ns.redirect_endpoint,
        disable_client_ip=ns.disable_client_ip,
        trusted_proxies=ns.trusted_proxy,
        gc_interval=ns.gc_interval,
        store=ns.store,
        store_cluster=ns.store_cluster,
        snapshot_path=snapshot_path(ns),
        snapshot_interval=ns.snapshot_interval,
        tls_cert_file=ns.tls_cert,
        tls_key_file=ns.tls_key,
        metrics_host=ns.metrics[0] if ns.metrics else "127.0.0.1",
        metrics_port=ns.metrics[1] if ns.metrics else None,
        rate=ns.rate,
        burst=ns.burst,
        ip_rate=ns.ip_rate,
        ip_burst=ns.ip_burst,
        limits=limits_from_args(ns),
        shutdown_grace=ns.shutdown_grace,
        log_requests=ns.log_requests,
        max_streams_per_connection=ns.max_streams_per_connection,
        watch_messages_per_second=ns.watch_messages_per_second,
    )
    server = DiscoveryServer(opts)
    port = await server.start_async(*ns.listen)
    print(f"discovery service on {ns.listen[0]}:{port}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{opts.metrics_host}:{server.metrics_port}/metrics", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop_async()


def main(argv: list[str] | None = None, prog: str = "kubespan discovery-service") -> int:
    ns = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if bool(ns.tls_cert) != bool(ns.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if ns.store_cluster and not ns.store:
        print("error: --store-cluster needs --store", file=sys.stderr)
        return 2
    if ns.store and ns.snapshot_path:
        print(
            "error: --snapshot-path is for the in-memory store; Valkey persists itself",
            file=sys.stderr,
        )
        return 2
    if ns.store and ns.store.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        print("error: --store takes a redis://, rediss:// or unix:// URL", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(ns))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
