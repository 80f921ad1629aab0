"""`kubespan-wg [-f|--foreground] IFNAME`: the userspace WireGuard daemon.

Called the way wireguard-go is, so `WG_QUICK_USERSPACE_IMPLEMENTATION=kubespan-wg
wg-quick up ...` works: the TUN interface and the UAPI socket exist by the time
the command returns, and the daemon carries on in the background.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import TextIO

from .netutil import InterfaceNameError, check_ifname
from .tun import Tun
from .uapisock import listen, socket_identity, socket_path

log = logging.getLogger("kubespan_dp")

DESCRIPTION = """\
Userspace WireGuard: creates the TUN interface IFNAME, listens on UDP (IPv4 and
IPv6) and serves the WireGuard configuration protocol on
/var/run/wireguard/IFNAME.sock, so `wg`, `wg-quick` and `wg syncconf` drive it
like wireguard-go or the kernel module.

It runs until SIGINT/SIGTERM, until the interface is deleted
(`ip link del IFNAME`) or until its socket file is removed; then it removes the
socket and the interface.
"""

EPILOG = """\
environment:
  LOG_LEVEL=verbose|debug|error|silent   how much to log (default: info)
  WG_PROCESS_FOREGROUND=1                same as --foreground
  KUBESPAN_WG_LOG_FILE=PATH              log here when running in the background
  KUBESPAN_WG_FASTPATH=0                 pure-Python packet path (default: the C loop)
  KUBESPAN_WG_TUN_OFFLOAD=0              same as --no-offload

example:
  WG_QUICK_USERSPACE_IMPLEMENTATION=kubespan-wg wg-quick up ./wg0.conf
"""

LEVELS = {
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "error": logging.ERROR,
    "silent": logging.CRITICAL + 1,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubespan-wg",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (default: detach once the interface is ready)",
    )
    p.add_argument(
        "--mtu", type=int, default=1420, help="initial MTU of the interface (default 1420)"
    )
    p.add_argument(
        "--no-offload",
        action="store_true",
        help="plain TUN: no virtio header, TSO/USO or coalesced writes (the C packet loop "
        "uses them by default where the kernel has them)",
    )
    p.add_argument("--version", action="version", version="kubespan-wg (kubespan-py) 0.1.0")
    p.add_argument("ifname", metavar="IFNAME", help="interface name (at most 15 bytes)")
    return p


def _setup_logging(ifname: str, stream: TextIO) -> None:
    level = LEVELS.get(os.environ.get("LOG_LEVEL", "info").lower(), logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {ifname} %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _detach() -> bool:
    """Fork into the background; True in the child, the parent exits 0."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    logfile = os.environ.get("KUBESPAN_WG_LOG_FILE")
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if logfile else devnull
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    return True


_early_signal: str | None = None


def _remember_signal(signum: int, _frame: object) -> None:
    """Until the event loop takes over, a stop signal is noted and honoured at start."""
    global _early_signal
    _early_signal = _early_signal or f"signal {signal.Signals(signum).name}"


def max_mtu() -> int:
    """The largest MTU the packet path in use carries whole: the C loop's slots hold
    MAX_PACKET bytes; the pure-Python path, a UDP payload less the overhead."""
    from .datapath import fastpath_enabled

    if fastpath_enabled():
        from . import _fastpath

        return int(_fastpath.MAX_PACKET)
    return 65535 - 32


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _remember_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    foreground = args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    ifname: str = args.ifname
    _setup_logging(ifname, sys.stderr)
    try:
        check_ifname(ifname)
    except InterfaceNameError as e:
        log.error("%s", e)
        return 2
    highest = max_mtu()
    if not 68 <= args.mtu <= highest:
        log.error("MTU %d out of range (68-%d)", args.mtu, highest)
        return 2
    from .datapath import fastpath_enabled

    try:
        # the C loop segments TSO super-packets and coalesces what it writes; the
        # pure-Python path reads a plain TUN
        tun = Tun(ifname, args.mtu, offload=fastpath_enabled() and not args.no_offload)
    except OSError as e:
        log.error("cannot create TUN interface %s: %s", ifname, e.strerror or e)
        return 1
    log.info("TUN offloads: %s", ", ".join(sorted(tun.offloads)) or "none")
    try:
        uapi = listen(tun.name)
        uapi_id = socket_identity(socket_path(tun.name))
    except OSError as e:
        log.error("cannot listen on %s: %s", socket_path(tun.name), e.strerror or e)
        tun.close()
        return 1
    if not foreground:
        _detach()
        logging.raiseExceptions = False
    try:
        reason = _run(tun, uapi, uapi_id)
    except Exception:
        log.exception("the device failed")
        _remove_socket(tun.name, uapi)
        tun.close()
        return 1
    log.info("shut down (%s)", reason)
    return 0


def _remove_socket(ifname: str, sock: socket.socket) -> None:
    """After a failed start: the socket file was created by us moments ago."""
    try:
        socket_path(ifname).unlink()
    except OSError:
        pass
    sock.close()


def _run(tun: Tun, uapi: socket.socket, uapi_id: tuple[int, int] | None) -> str:
    from .device import Device  # imports the core; keep --help fast and independent

    async def go() -> str:
        device = Device(tun, uapi, uapi_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, device.stop, f"signal {signal.Signals(sig).name}")
        if _early_signal is not None:
            device.stop(_early_signal)
        return await device.run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())


if __name__ == "__main__":
    sys.exit(main())
