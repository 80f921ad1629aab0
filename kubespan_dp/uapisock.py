"""The UAPI unix socket: /var/run/wireguard/IFNAME.sock, served on the event loop.

A connection carries any number of requests: `get=1\\n\\n`, `set=1\\n...\\n\\n`, and
our extension `stats=1\\n\\n` (drop counters). Any other operation closes the
connection, as wireguard-go does. Requests are read whole before the device sees
them, so a malformed one changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Protocol

from .netutil import check_ifname
from .uapi import EINVAL, SetRequest, UapiError, format_errno, parse_set

RUN_DIR = Path("/var/run/wireguard")
MAX_LINE = 1 << 16
MAX_REQUEST = 16 << 20  # a full setconf for thousands of peers fits

log = logging.getLogger("kubespan_dp.uapi")


class UapiHandler(Protocol):
    def uapi_get(self) -> str: ...
    def uapi_set(self, request: SetRequest) -> None: ...
    def uapi_stats(self) -> str: ...


def socket_path(ifname: str, run_dir: Path = RUN_DIR) -> Path:
    """Where the UAPI socket of `ifname` lives (the name is checked: no way out of run_dir)."""
    return run_dir / f"{check_ifname(ifname)}.sock"


def listen(ifname: str) -> socket.socket:
    """Bind the UAPI socket; refuse if another daemon is serving the name."""
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = socket_path(ifname)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket from a daemon that died
        else:
            raise OSError(f"{path} is in use by another daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)  # root-only: the socket hands out the private key
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def socket_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the socket file, None if it is gone or not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return st.st_dev, st.st_ino


async def serve(sock: socket.socket, handler: UapiHandler) -> asyncio.base_events.Server:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _connection(reader, writer, handler)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("UAPI connection failed")
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_connect, sock=sock, limit=MAX_LINE)


class _Unreadable(UapiError):
    """The request could not be read whole; the stream is out of step, so close."""


async def _readline(reader: asyncio.StreamReader) -> str | None:
    """One line without its newline; None at EOF."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raw = e.partial
    except asyncio.LimitOverrunError:
        raise _Unreadable(EINVAL, "line too long") from None
    try:
        return raw.rstrip(b"\n").decode("utf-8")
    except UnicodeDecodeError:
        raise _Unreadable(EINVAL, "request is not UTF-8 text") from None


async def _read_body(reader: asyncio.StreamReader) -> list[str]:
    """Lines up to the blank line (or EOF, which ends a request as wireguard-go does)."""
    lines: list[str] = []
    size = 0
    while line := await _readline(reader):
        size += len(line) + 1
        if size > MAX_REQUEST:
            raise _Unreadable(EINVAL, "request too large")
        lines.append(line)
    return lines


async def _connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: UapiHandler
) -> None:
    while True:
        try:
            op = await _readline(reader)
            if op is None:
                return
            if op in ("get=1", "stats=1"):
                if await _readline(reader) != "":
                    raise _Unreadable(EINVAL, f"trailing data after {op}")
                body = handler.uapi_get() if op == "get=1" else handler.uapi_stats()
                reply = body + format_errno(0)
            elif op == "set=1":
                lines = await _read_body(reader)
                handler.uapi_set(parse_set(lines))
                reply = format_errno(0)
            else:
                log.warning("UAPI: unknown operation %r, closing", op[:20])
                return
        except UapiError as e:
            log.error("UAPI request refused (errno=%d): %s", e.errno, e)
            writer.write(format_errno(e.errno).encode())
            await writer.drain()
            if isinstance(e, _Unreadable):
                return
            continue
        writer.write(reply.encode())
        await writer.drain()
