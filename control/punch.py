"""Coordinated hole punching: when a peer's endpoints change, both ends probe at once.

A NAT lets a datagram in only as the answer to one that went out through it, so two
nodes behind NATs reach each other only if each sends to the other's mapped address
while the other does the same. Discovery makes that coincidence happen: a new endpoint
of B reaches A at about the moment B learns what changed too (A's affiliate is new to
B, or B's own affiliate gained the endpoint a public node harvested for it). From
then on, for a short window, each end:

- sends a punch datagram every PUNCH_INTERVAL from WireGuard's port to every new
  endpoint (control.wgport), which opens its own NAT's mapping towards the other;
- if the peer is not up, points WireGuard at each new endpoint in turn for TRY_DWELL
  (one handshake retry, REKEY_TIMEOUT), instead of waiting out the 15 s endpoint
  cycle, so a handshake crosses the two open mappings within seconds.

Afterwards the usual endpoint cycle (control.peerstate) takes over. Once up, the
persistent keepalive (25 s) keeps the mappings open: it is below Linux conntrack's UDP
timeouts (30 s before a reply is seen, 120 s after) and common home routers' (>= 30 s).

A punch is one zero byte: shorter than any WireGuard message, so every implementation
(kernel, wireguard-go, ours) drops it silently, and it says nothing about anyone.

Sans-I/O: times are passed in (any monotonic clock, the same for every call); the agent
does the sending and the reconciling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kubespan_dp.netutil import Address

PUNCH_PAYLOAD = b"\x00"
PUNCH_INTERVAL = 0.5
PUNCH_WINDOW = 10.0
TRY_DWELL = 5.0  # REKEY_TIMEOUT: WireGuard retries a handshake this often


@dataclass
class _Window:
    endpoints: tuple[Address, ...]  # the peer's new endpoints, in its candidate order
    opened: float
    until: float
    next_punch: float
    slot: int | None = -1  # the endpoint to try as poll() last saw it (-1: not yet)


class Puncher:
    """Punch windows per peer (keyed by public key) and what is due when."""

    def __init__(
        self,
        interval: float = PUNCH_INTERVAL,
        window: float = PUNCH_WINDOW,
        dwell: float = TRY_DWELL,
    ) -> None:
        self.interval = interval
        self.window = window
        self.dwell = dwell
        self._known: dict[str, frozenset[Address]] = {}
        self._windows: dict[str, _Window] = {}

    def observe(self, key: str, endpoints: Sequence[Address], now: float) -> bool:
        """Note a peer's current endpoints; open a window over the new ones (True if so)."""
        known = self._known.get(key, frozenset())
        self._known[key] = frozenset(endpoints)
        new = tuple(dict.fromkeys(e for e in endpoints if e not in known))
        if new:
            self.open(key, new, now)
        return bool(new)

    def open(self, key: str, endpoints: Sequence[Address], now: float) -> None:
        """(Re)start the window of peer `key` over `endpoints`: a punch is due at once.
        It lasts long enough for each endpoint to get its turn in WireGuard."""
        if not endpoints:
            return
        until = now + max(self.window, self.dwell * len(endpoints))
        self._windows[key] = _Window(tuple(endpoints), now, until, now)

    def endpoint_to_try(self, key: str, now: float) -> Address | None:
        """The endpoint WireGuard should use for the peer now if it is not up; None
        outside a window (the usual endpoint cycle decides)."""
        window = self._windows.get(key)
        if window is None:
            return None
        slot = self._slot(window, now)
        return window.endpoints[slot] if slot is not None else None

    def poll(self, now: float) -> tuple[list[Address], bool]:
        """What is due at `now`: the endpoints to punch (each window's next punch moves
        on by one interval), and whether some peer's endpoint to try changed since the
        last poll (the caller reconciles). Ended windows are dropped."""
        due: list[Address] = []
        turned = False
        for key, window in list(self._windows.items()):
            slot = self._slot(window, now)
            if slot != window.slot:  # a turn, or the end of the turns: reconcile
                window.slot = slot
                turned = True
            if now >= window.until:
                del self._windows[key]
                continue
            if now >= window.next_punch:
                due.extend(window.endpoints)
                # From now, not from the missed instant: a late poll sends once, not a burst.
                window.next_punch = now + self.interval
        return list(dict.fromkeys(due)), turned

    def next_deadline(self) -> float | None:
        """When poll() next has something to do; None without open windows."""
        times: list[float] = []
        for window in self._windows.values():
            times += [window.next_punch, window.until]
            if window.slot is not None and window.slot >= 0:
                times.append(min(window.opened + (window.slot + 1) * self.dwell, window.until))
        return min(times, default=None)

    def active(self) -> list[str]:
        """Keys of the peers with an open window."""
        return sorted(self._windows)

    def forget_except(self, keys: Iterable[str]) -> None:
        keep = set(keys)
        for table in (self._known, self._windows):
            for key in [k for k in table if k not in keep]:
                del table[key]

    def _slot(self, window: _Window, now: float) -> int | None:
        if now >= window.until or now < window.opened:
            return None
        slot = int((now - window.opened) // self.dwell)
        return slot if slot < len(window.endpoints) else None


def send_punches(listen_port: int, endpoints: Iterable[Address]) -> dict[Address, Exception]:
    """Send one punch from WireGuard's port to each endpoint; the errors by endpoint
    (an unreachable private address of a peer elsewhere is normal)."""
    from control import wgport  # raw sockets: only the agent, never the unit tests

    return wgport.send_to_each(listen_port, endpoints, PUNCH_PAYLOAD)
