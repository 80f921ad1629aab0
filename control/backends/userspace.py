"""WireGuard in a userspace daemon, driven over its UAPI socket.

The daemon is ours (`kubespan-wg -f LINK`, from kubespan_dp) by default; any program
with wireguard-go's command line and UAPI works (the tests also run wireguard-go).
The backend starts the daemon in the foreground, configures it over
/var/run/wireguard/LINK.sock, and supervises it: if the daemon dies, the next call
restarts it and re-applies the whole configuration (peers lose their sessions then,
which a fresh handshake restores).

`apply_peers` sends only the difference from what was last applied, in one UAPI
transaction: new peers are created, vanished ones removed, and changed ones updated
with `update_only` so their sessions and counters survive.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from control.backends.base import (
    BackendError,
    PeerConfig,
    PeerState,
    diff_peers,
    validate_device,
    validate_peers,
)
from control.backends.uapi_client import UAPIClient, key_hex, peer_items
from kubespan_dp.uapisock import RUN_DIR, socket_path

log = logging.getLogger(__name__)


def default_daemon_argv() -> list[str]:
    """Our daemon: the console script next to this interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("kubespan-wg")
    if script.exists():
        return [str(script)]
    found = shutil.which("kubespan-wg")
    return [found] if found else [sys.executable, "-m", "kubespan_dp.cli"]


def diff_items(old: dict[bytes, PeerConfig], new: dict[bytes, PeerConfig]) -> list[tuple[str, str]]:
    """UAPI items turning `old` into `new` (both from validate_peers), touching only what
    changed: a changed peer gets `update_only` and its changed fields alone, so its
    session and counters survive."""
    diff = diff_peers(old, new)
    items: list[tuple[str, str]] = []
    for key in diff.removed:
        items += peer_items(key, remove=True)
    for update in diff.updates:
        fields: dict[str, Any] = {name: getattr(update.peer, name) for name in update.fields}
        items += peer_items(update.peer.public_key, update_only=not update.new, **fields)
    return items


def _merge_endpoint(old: PeerConfig | None, new: PeerConfig) -> PeerConfig:
    """Remember the endpoint last set when the new config leaves it alone (None)."""
    if new.endpoint is None and old is not None and old.endpoint is not None:
        return PeerConfig(
            new.public_key,
            new.preshared_key,
            old.endpoint,
            new.persistent_keepalive,
            new.allowed_ips,
        )
    return new


class UserspaceBackend:
    mode = "userspace"

    def __init__(
        self,
        daemon_argv: Sequence[str] | None = None,
        *,
        netns: str | None = None,
        run_dir: Path = RUN_DIR,
        start_timeout: float = 60.0,  # a slow machine (a VM under load) can need 20 s+
        env: dict[str, str] | None = None,
    ) -> None:
        """`daemon_argv` is the command before `-f LINK` (default: our kubespan-wg);
        `netns` names a network namespace to run the daemon and its link in."""
        self.daemon_argv = list(daemon_argv) if daemon_argv else default_daemon_argv()
        self.netns = netns
        self.run_dir = Path(run_dir)
        self.start_timeout = start_timeout
        self.env = env
        self.restarts = 0
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._link: str | None = None
        self._device: tuple[bytes, int, int, int] | None = None  # private key, port, fwmark, mtu
        self._peers: dict[bytes, PeerConfig] | None = {}  # None: device state unknown

    # -- the WireGuardBackend contract ------------------------------------------

    def up(self, link: str, private_key: bytes, listen_port: int, fwmark: int, mtu: int) -> None:
        validate_device(link, private_key, listen_port, fwmark, mtu)
        with self._lock:
            if self._link is not None and self._link != link:
                raise BackendError(f"backend already runs link {self._link!r}")
            self._link = link
            self._device = (bytes(private_key), listen_port, fwmark, mtu)
            if self._running():
                self._configure_device(replace_peers=False)
                return
            self._start()
            self._peers = {}

    def apply_peers(self, peers: Sequence[PeerConfig]) -> None:
        new = validate_peers(peers)
        with self._lock:
            self._ensure_running()
            if self._peers is None:  # a failed transaction left the device unknown: rebuild
                items = [("replace_peers", "true"), *diff_items({}, new)]
                old: dict[bytes, PeerConfig] = {}
            else:
                old = self._peers
                items = diff_items(old, new)
            if items:
                try:
                    self._client().set(items)
                except BackendError:
                    self._peers = None  # partly applied, maybe; next call starts over
                    raise
            self._peers = {k: _merge_endpoint(old.get(k), p) for k, p in new.items()}

    def peer_states(self) -> dict[bytes, PeerState]:
        with self._lock:
            self._ensure_running()
            dev = self._client().get()
        return {
            p.public_key: PeerState(
                p.public_key, p.endpoint, p.last_handshake, p.rx_bytes, p.tx_bytes
            )
            for p in dev.peers
        }

    def down(self) -> None:
        with self._lock:
            self._stop_process()
            if self._link is not None:
                self._delete_link(self._link)
                self._remove_socket(self._link)
            self._link = None
            self._device = None
            self._peers = {}

    # -- extras for the agent ---------------------------------------------------

    @property
    def link(self) -> str | None:
        return self._link

    def listen_port(self) -> int:
        """The port the daemon really listens on (useful with listen_port=0)."""
        with self._lock:
            self._ensure_running()
            return self._client().get().listen_port

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- process supervision ----------------------------------------------------

    def _client(self) -> UAPIClient:
        assert self._link is not None
        return UAPIClient(socket_path(self._link, self.run_dir))

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_running(self) -> None:
        if self._link is None or self._device is None:
            raise BackendError("backend is not up")
        if self._running():
            return
        code = self._proc.returncode if self._proc is not None else None
        log.warning("WireGuard daemon for %s exited (%s); restarting", self._link, code)
        self.restarts += 1
        self._start()
        peers, self._peers = self._peers, None
        if peers:
            self._client().set(diff_items({}, peers))
        self._peers = peers if peers is not None else {}

    def _start(self) -> None:
        assert self._link is not None
        link = self._link
        path = socket_path(link, self.run_dir)
        if path.exists():
            if UAPIClient(path, timeout=2).ping():
                raise BackendError(f"another WireGuard daemon already serves {link!r}")
            path.unlink(missing_ok=True)  # stale: its daemon died without cleaning up
        argv = [*self.daemon_argv, "-f", link]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = dict(os.environ, **(self.env or {}))
        self._output.clear()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot start WireGuard daemon {argv[0]!r}: {exc}") from exc
        threading.Thread(target=self._pump_output, args=(self._proc,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        client = UAPIClient(path, timeout=2)
        while not (path.exists() and client.ping()):
            if self._proc.poll() is not None:
                raise BackendError(
                    f"WireGuard daemon for {link!r} exited with {self._proc.returncode}: "
                    + " | ".join(self._output)
                )
            if time.monotonic() > deadline:
                self._stop_process()
                raise BackendError(f"WireGuard daemon for {link!r} did not open {path}")
            time.sleep(0.05)
        try:
            self._configure_device(replace_peers=True)
        except Exception:
            self._stop_process()
            raise

    def _configure_device(self, replace_peers: bool) -> None:
        assert self._device is not None and self._link is not None
        private_key, port, fwmark, mtu = self._device
        items = [
            ("private_key", key_hex(private_key)),
            ("listen_port", str(port)),
            ("fwmark", str(fwmark)),
        ]
        if replace_peers:
            items.append(("replace_peers", "true"))
        self._client().set(items)
        try:
            with IPRoute(**({"netns": self.netns} if self.netns else {})) as ipr:
                found = ipr.link_lookup(ifname=self._link)
                if not found:
                    raise BackendError(f"daemon runs but link {self._link!r} is missing")
                ipr.link("set", index=found[0], mtu=mtu, state="up")
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot set up link {self._link!r}: {exc}") from exc

    def _pump_output(self, proc: subprocess.Popen) -> None:
        """Forward the daemon's output to our log (and keep a tail for error messages)."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._output.append(line)
                log.debug("wg[%s]: %s", self._link, line)
        proc.stdout.close()

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        proc.wait()

    def _delete_link(self, link: str) -> None:
        try:
            with IPRoute(**({"netns": self.netns} if self.netns else {})) as ipr:
                for index in ipr.link_lookup(ifname=link):
                    ipr.link("del", index=index)
        except Exception as exc:  # the namespace may be gone already
            log.debug("deleting link %s: %s", link, exc)

    def _remove_socket(self, link: str) -> None:
        path = socket_path(link, self.run_dir)
        if path.exists() and not UAPIClient(path, timeout=2).ping():
            path.unlink(missing_ok=True)
