"""`kubespan discovery-service`: run the discovery service until SIGINT/SIGTERM.

On a signal the service stops accepting calls, ends watches, and writes its snapshot
(when --snapshot-path is set) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from ipaddress import ip_network

from control.discovery.server import DiscoveryServer, ServerOptions


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
        prog=prog, description="Run a KubeSpan discovery service (Sidero discovery API)."
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
    p.add_argument("--snapshot-path", metavar="FILE", help="persist state here; restored at start")
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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def _serve(ns: argparse.Namespace) -> None:
    opts = ServerOptions(
        redirect_endpoint=ns.redirect_endpoint,
        disable_client_ip=ns.disable_client_ip,
        trusted_proxies=ns.trusted_proxy,
        gc_interval=ns.gc_interval,
        snapshot_path=ns.snapshot_path,
        snapshot_interval=ns.snapshot_interval,
        tls_cert_file=ns.tls_cert,
        tls_key_file=ns.tls_key,
        metrics_host=ns.metrics[0] if ns.metrics else "127.0.0.1",
        metrics_port=ns.metrics[1] if ns.metrics else None,
        rate=ns.rate,
        burst=ns.burst,
        ip_rate=ns.ip_rate,
        ip_burst=ns.ip_burst,
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
    try:
        asyncio.run(_serve(ns))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
