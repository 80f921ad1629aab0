"""The seam between the device and a packet path: one protocol for both paths.

`pypath.PyDataPath` (pure Python, needs no compiled extension) and
`fastloop.FastDataPath` (the C loop in `_fastpath`) implement `DataPath`; the device
talks to whichever `make_datapath` chose and to nothing else of theirs.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .netutil import Address

if TYPE_CHECKING:
    from .core import Output, WireGuardCore

OnHandshake = Callable[[bytes, Address, float], None]


class DataPath(Protocol):
    """What the device needs from a packet path."""

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register the readers; start moving packets."""

    def detach(self) -> None:
        """Stop; unregister everything."""

    def rebind(self, sock4: socket.socket | None, sock6: socket.socket | None) -> None:
        """Use other UDP sockets (listen port or fwmark changed)."""

    def emit(self, out: Output) -> None:
        """Send a core `Output` (timers, handshakes and UAPI changes produce them)."""

    def routes_changed(self) -> None:
        """The core's allowed IPs changed (a UAPI set): apply them now."""

    def handshake_backlog(self) -> int:
        """Handshake messages waiting inside the path (counted for "under load")."""

    @property
    def dropped(self) -> Counter[str]:
        """What the path dropped, by reason."""


def fastpath_enabled() -> bool:
    """The C packet loop is used unless KUBESPAN_WG_FASTPATH=0 asks for pure Python."""
    return os.environ.get("KUBESPAN_WG_FASTPATH", "1") != "0"


def make_datapath(
    core: WireGuardCore,
    tun_fd: int,
    on_handshake: OnHandshake,
    on_batch: Callable[[], None],
    on_link_gone: Callable[[], None],
    offload_flags: int = 0,
) -> DataPath:
    """The C path when enabled (its extension is imported only then), else Python.
    ``offload_flags``: the TUN_F_* offloads the TUN was opened with (tun.Tun; 0 for a
    plain TUN), which only the C path can serve."""
    if fastpath_enabled():
        from .fastloop import FastDataPath

        return FastDataPath(
            core, tun_fd, on_handshake, on_batch, on_link_gone, offload_flags=offload_flags
        )
    if offload_flags:
        raise ValueError("the pure-Python path needs a TUN without offloads")
    from .pypath import PyDataPath

    return PyDataPath(core, tun_fd, on_handshake, on_batch, on_link_gone)
