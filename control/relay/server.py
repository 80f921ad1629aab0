"""The relay's UDP socket, metrics and command line (`kubespan relay`).

One socket (dual-stack by default) receives everything and forwards from the same
socket, so every node sees one relay address. The routing is control.relay.core; this
is the glue. The agent runs it in-process when its config says the node is a relay.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from control.config import ConfigError, MachineConfig, load_config
from control.relay import registration
from control.relay.core import DROP_REASONS, MESSAGE_NAMES, RelayCore
from control.routing import WIREGUARD_MARK
from kubespan_dp.netutil import parse_endpoint

log = logging.getLogger("control.relay")

DEFAULT_PORT = 51821
EXPIRE_INTERVAL = 1.0
SOCKET_BUFFER = 4 << 20  # absorb bursts of relayed data


def relay_key(config: MachineConfig) -> bytes:
    return registration.registration_key(config.cluster_id, config.secret_bytes)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, core: RelayCore) -> None:
        self.core = core
        self.transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        to = self.core.receive(data, addr, time.time())
        if to is not None and self.transport is not None:
            self.transport.sendto(data, to)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a node that went away: nothing to do but count it.
        self.send_errors += 1


class RelayServer:
    def __init__(self, core: RelayCore, fwmark: int = WIREGUARD_MARK) -> None:
        self.core = core
        self.fwmark = fwmark
        self._protocol = _Protocol(core)
        self._expiry: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str = "::", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on host:port ("::": every address, IPv4 too); returns the bound address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.fwmark:
                # Marked like WireGuard's own packets, KubeSpan's routing on this node never
                # steers relayed datagrams into its own tunnel.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self._protocol, sock=sock)
        self._expiry = asyncio.create_task(self._expire_loop())
        bound = sock.getsockname()
        self.address = (bound[0], bound[1])
        log.info("relay listening on %s port %d", bound[0], bound[1])
        return self.address

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            self.core.expire(time.time())

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            try:
                await self._expiry
            except asyncio.CancelledError:
                pass
            self._expiry = None
        if self._protocol.transport is not None:
            self._protocol.transport.close()
            self._protocol.transport = None

    def families(self) -> list[Metric]:
        core = self.core
        forwarded = CounterMetricFamily(
            "kubespan_relay_forwarded_packets_total",
            "WireGuard messages forwarded, by message type.",
            labels=["type"],
        )
        for name in MESSAGE_NAMES.values():
            forwarded.add_metric([name], core.forwarded[name])
        dropped = CounterMetricFamily(
            "kubespan_relay_dropped_packets_total",
            "Datagrams dropped, by reason.",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], core.dropped[reason])
        tables = GaugeMetricFamily(
            "kubespan_relay_table_entries",
            "Entries in the relay's tables (registered nodes, pending handshakes, "
            "session indices, rate-limited sources).",
            labels=["table"],
        )
        for table, n in core.table_sizes().items():
            tables.add_metric([table], n)
        return [
            forwarded,
            CounterMetricFamily(
                "kubespan_relay_forwarded_bytes_total",
                "Bytes of WireGuard messages forwarded.",
                value=core.forwarded_bytes,
            ),
            dropped,
            CounterMetricFamily(
                "kubespan_relay_registrations_total",
                "Registrations accepted.",
                value=core.registrations,
            ),
            CounterMetricFamily(
                "kubespan_relay_send_errors_total",
                "Errors reported by the socket (ICMP unreachable from a node).",
                value=self._protocol.send_errors,
            ),
            tables,
        ]


# -- command line ---------------------------------------------------------------------------

DESCRIPTION = """\
Run a KubeSpan relay: forward WireGuard traffic between nodes that cannot reach each other
directly (both behind NATs that change the port per destination).

Nodes whose config lists this relay (KubeSpanPyConfig `relays`) register with it from
their WireGuard port every 20 s and announce its address as one more endpoint. The relay
routes each WireGuard message without decrypting it: an initiation to the registered node
whose public key its mac1 was made for, everything else by the session indices of the
handshakes it forwarded. It never sends to an address that did not recently register or
take part in such a handshake; everything else is dropped and counted (see the metrics).

The relay must be a member of the cluster: it reads the cluster id and secret from the
machine config given with --config (registrations are authenticated with a key derived
from the secret). It cannot read or forge the nodes' traffic: that is end-to-end
WireGuard."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubespan relay",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        required=True,
        metavar="FILE",
        help="machine config with the cluster id and secret; repeat to combine files",
    )
    parser.add_argument(
        "--listen",
        default=f"[::]:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"UDP address to listen on (default [::]:{DEFAULT_PORT}, IPv4 and IPv6)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
    )
    parser.add_argument(
        "--fwmark",
        type=lambda text: int(text, 0),
        default=WIREGUARD_MARK,
        help=f"mark for the relay's packets (default {WIREGUARD_MARK:#x}, KubeSpan's "
        "WireGuard mark, so a KubeSpan node's routing leaves them alone; 0: none)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


async def serve(config: MachineConfig, listen: tuple[str, int], args: argparse.Namespace) -> None:
    from control.promhttp import MetricsServer

    server = RelayServer(RelayCore(relay_key(config)), args.fwmark)
    await server.start(*listen)
    metrics: MetricsServer | None = None
    if args.metrics_listen:
        host, port = parse_endpoint(args.metrics_listen)
        metrics = MetricsServer(server.families)
        await metrics.start(str(host), port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        log.info("relay stopping")
        await server.stop()
        if metrics is not None:
            await metrics.stop()


def main(argv: list[str] | None = None) -> int:
    from control.logsetup import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = load_config(*args.config)
        if not config.cluster_id or not config.cluster_secret:
            raise ConfigError([("cluster", "the relay needs the cluster id and secret")])
        host, port = parse_endpoint(args.listen)
    except (ConfigError, ValueError) as exc:
        print(f"kubespan relay: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve(config, (str(host), port), args))
    except OSError as exc:
        print(f"kubespan relay: {exc}", file=sys.stderr)
        return 1
    return 0
