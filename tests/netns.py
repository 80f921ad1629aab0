"""WireGuard helpers for tests built on namespace labs (control.netlab).

Daemons (wireguard-go or ours) started in a namespace, raw UAPI requests, two hosts
joined by a veth with a configured WireGuard pair, TCP transfers between namespaces.
The namespace primitives themselves (Netns, Lab, the ledger, unique names,
wait_until) live in control.netlab; `Lab` here adds the facility check and `daemon()`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from control import netlab
from control.netlab import LEDGER, Netns, add_address, stop_processes, unique_name, wait_until, wggo
from kubespan_dp.uapisock import socket_path as uapi_path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
TOOLS = ("ip", "wg", "wireguard-go", "nft")


def require_facilities() -> None:
    """Fail loudly (never skip) when the machine cannot run namespace tests."""
    problems = netlab.missing_facilities(TOOLS)
    if problems:
        raise RuntimeError("netns tests need: " + "; ".join(problems))


class Lab(netlab.Lab):
    """A lab that refuses to start where the tests cannot run, and starts daemons."""

    def __init__(self) -> None:
        require_facilities()
        super().__init__("ks")

    def daemon(
        self,
        ns: Netns,
        kind: str,
        ifname: str | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> Daemon:
        ifname = ifname or unique_name("wg", 8)
        d = start_daemon(ns, ifname, kind, env, args)
        self.defer(d.finish)
        return d


# --------------------------------------------------------------------------- WireGuard daemons


def wait_for_uapi(ifname: str, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    """Wait until the daemon's UAPI socket accepts connections."""
    path = uapi_path(ifname)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"daemon for {ifname} exited {proc.returncode}: {out}")
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"UAPI socket {path} did not appear in {timeout}s")


def uapi_request(ifname: str, request: str, timeout: float = 10) -> str:
    """Send one raw UAPI request and return the whole reply text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(uapi_path(ifname)))
        s.sendall(request.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


# Exit statuses of a crash (ASan's abort_on_error ends in SIGABRT), never of a stop.
CRASH_SIGNALS = {-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, -signal.SIGFPE}
SANITIZER_REPORT = "ERROR: AddressSanitizer"


class DaemonCrashed(AssertionError):
    """A daemon died of a crash or a sanitizer reported an error in it."""


@dataclass
class Daemon:
    """A WireGuard userspace daemon (wireguard-go or ours) running in the foreground."""

    ns: Netns
    ifname: str
    proc: subprocess.Popen
    kind: str
    _output: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the daemon printed (only after it stopped)."""
        if self.proc.stdout is None or self.alive():
            return ""
        if self._output is None:
            self._output = self.proc.stdout.read().decode(errors="replace")
        return self._output

    def stop(self, timeout: float = 10) -> int:
        stop_processes([self.proc], grace=timeout)
        return self.proc.returncode

    def finish(self) -> None:
        """Stop it (the lab's cleanup) and raise if it had crashed or a sanitizer
        reported an error: then the test fails, also when that came late."""
        code = self.stop()
        out = self.output()
        if code in CRASH_SIGNALS or SANITIZER_REPORT in out:
            uapi_path(self.ifname).unlink(missing_ok=True)  # a crash leaves it behind
            sys.stderr.write(out)  # pytest shows the whole report with the failure
            raise DaemonCrashed(f"{self.kind} {self.ifname} exited {code}: ...{out[-1500:]}")


# Daemon kinds: ours, the modern wireguard-go (the anchor), bookworm's old one.
WGGO_KINDS = {"wireguard-go": "modern", "wireguard-go-old": "old"}
# test ids for the wireguard-go kinds
WGGO_IDS = {"wireguard-go": "wggo-modern", "wireguard-go-old": "wggo-old"}


def start_daemon(
    ns: Netns,
    ifname: str,
    kind: str,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Daemon:
    """Start `kubespan-wg` or a wireguard-go (WGGO_KINDS) in the foreground inside `ns`
    (`args`: more options before the interface name)."""
    if kind in WGGO_KINDS:
        argv = [str(wggo.binary(WGGO_KINDS[kind])), "-f", *args, ifname]
    elif kind == "kubespan-wg":
        argv = [str(VENV_BIN / "kubespan-wg"), "-f", *args, ifname]
    else:
        raise ValueError(kind)
    LEDGER.sockets.add(uapi_path(ifname))
    # wireguard-go logs only with LOG_LEVEL set; ours logs at info by default.
    proc = ns.popen(argv, env={"LOG_LEVEL": "verbose", **(env or {})}, stdout=subprocess.PIPE)
    daemon = Daemon(ns, ifname, proc, kind)
    try:
        wait_for_uapi(ifname, proc=proc)
        if kind == "kubespan-wg" and ASAN_BUILD:
            check_sanitized(proc.pid, ASAN_BUILD)
    except BaseException:
        daemon.stop()
        raise
    return daemon


# scripts/asan.sh: the scratch copy whose AddressSanitizer build our daemons must run
ASAN_BUILD = os.environ.get("KS_ASAN_BUILD", "")


def check_sanitized(pid: int, build: str) -> None:
    """The daemon runs with the ASan runtime and the fast path of `build`, not the
    worktree's (which an import hook or another interpreter could bring in)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    files = {line.split()[-1] for line in maps if "/" in line}
    fastpath = {f for f in files if "/_fastpath" in f}
    assert any("/libasan" in f for f in files), f"daemon {pid} runs without libasan"
    assert all(f.startswith(build + "/") for f in fastpath), f"daemon {pid} loaded {fastpath}"


def wg(ns: Netns, *args: str, input: str | None = None) -> str:
    return ns.run("wg", *args, input=input).stdout


def ping(ns: Netns, address: str, count: int = 3, timeout: float = 30) -> None:
    """Ping until `count` replies arrive in a row; raise if it never works."""

    def ok() -> bool:
        r = ns.run("ping", "-c", "1", "-W", "1", address, check=False, timeout=10)
        return r.returncode == 0

    wait_until(ok, timeout=timeout, interval=0.2, what=f"ping {address} from {ns.name}")
    ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", address, timeout=timeout)


# --------------------------------------------------------------------------- two WireGuard hosts

INNER4 = ("10.77.0.1", "10.77.0.2")
INNER6 = ("fd77::1", "fd77::2")
OUTER4 = ("192.168.77.1", "192.168.77.2")
OUTER6 = ("fd00:77::1", "fd00:77::2")


@dataclass
class KernelLink:
    """A kernel WireGuard link in place of a daemon (kind "kernel", VM tests only):
    no process behind it; it goes away with its namespace."""

    ns: Netns
    ifname: str
    kind: str = "kernel"

    def alive(self) -> bool:
        return True

    def output(self) -> str:
        return ""

    def stop(self, timeout: float = 10) -> int:
        self.ns.run("ip", "link", "del", self.ifname, check=False)
        return 0


@dataclass
class WgHost:
    ns: Netns
    daemon: Daemon | KernelLink
    private_key: str  # base64, as `wg` wants it
    public_key: str
    port: int
    veth: str

    @property
    def ifname(self) -> str:
        return self.daemon.ifname

    def wg(self, *args: str, input: str | None = None) -> str:
        return wg(self.ns, *args, input=input)

    def set_peer(self, peer: WgHost, allowed_ips: str, endpoint: str, *options: str) -> None:
        """`wg set` `peer` as this host's peer with these allowed IPs and endpoint, plus
        any further peer options (e.g. "preshared-key", FILE)."""
        self.wg(
            "set",
            self.ifname,
            "peer",
            peer.public_key,
            *options,
            "allowed-ips",
            allowed_ips,
            "endpoint",
            endpoint,
        )

    def dump(self) -> list[list[str]]:
        """`wg show IFNAME dump` split into fields; row 0 is the interface."""
        return [line.split("\t") for line in self.wg("show", self.ifname, "dump").splitlines()]


def genkey(ns: Netns) -> tuple[str, str]:
    private = ns.run("wg", "genkey").stdout.strip()
    public = ns.run("wg", "pubkey", input=private + "\n").stdout.strip()
    return private, public


def build_pair(
    lab: Lab,
    kind_a: str,
    kind_b: str,
    *,
    outer: str = "4",
    psk: str | None = None,
    keepalive: int = 0,
    ports: tuple[int, int] = (51820, 51821),
    envs: tuple[dict[str, str] | None, dict[str, str] | None] = (None, None),
) -> tuple[WgHost, WgHost]:
    """Two namespaces joined by a veth (v4+v6 outer addresses), each with a WireGuard
    daemon of the given kind (or "kernel": a kernel WireGuard link, in the VM), configured
    with stock `wg` as peers of each other, with inner addresses INNER4/INNER6. `outer`
    ("4" or "6") picks the endpoint family; `envs` adds environment variables to each
    daemon."""
    ns = [lab.netns("wa"), lab.netns("wb")]
    veths = lab.veth(ns[0], ns[1])
    for i in range(2):
        add_address(ns[i], veths[i], f"{OUTER4[i]}/24")
        add_address(ns[i], veths[i], f"{OUTER6[i]}/64")
    hosts = []
    for i, kind in enumerate((kind_a, kind_b)):
        d: Daemon | KernelLink
        if kind == "kernel":
            d = KernelLink(ns[i], unique_name("kwg", 8))
            ns[i].run("ip", "link", "add", d.ifname, "type", "wireguard")
        else:
            d = lab.daemon(ns[i], kind, env=envs[i])
        priv, pub = genkey(ns[i])
        hosts.append(WgHost(ns[i], d, priv, pub, ports[i], veths[i]))
    tmp = lab.tempdir()
    for i, h in enumerate(hosts):
        other = hosts[1 - i]
        keyfile = tmp / f"key{i}"
        keyfile.write_text(h.private_key + "\n")
        args = [
            "set",
            h.ifname,
            "private-key",
            str(keyfile),
            "listen-port",
            str(h.port),
            "peer",
            other.public_key,
            "allowed-ips",
            f"{INNER4[1 - i]}/32,{INNER6[1 - i]}/128",
            "endpoint",
            _endpoint(outer, 1 - i, other.port),
        ]
        if psk:
            pskfile = tmp / "psk"
            pskfile.write_text(psk + "\n")
            args += ["preshared-key", str(pskfile)]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        h.wg(*args)
        add_address(h.ns, h.ifname, f"{INNER4[i]}/24")
        add_address(h.ns, h.ifname, f"{INNER6[i]}/64")
        h.ns.run("ip", "link", "set", h.ifname, "mtu", "1420", "up")
    return hosts[0], hosts[1]


def _endpoint(outer: str, i: int, port: int) -> str:
    return f"{OUTER4[i]}:{port}" if outer == "4" else f"[{OUTER6[i]}]:{port}"


# --------------------------------------------------------------------------- traffic


def tcp_transfer(
    server_ns: Netns,
    client_ns: Netns,
    server_ip: str,
    nbytes: int,
    port: int = 5201,
    timeout: float = 300,
    mss: int = 0,
) -> tuple[str, str, float]:
    """Send `nbytes` of random-looking data over TCP from client_ns to server_ns
    (`mss`: the client's TCP_MAXSEG, 0 for the route's).

    Returns (sha256 sent, sha256 received, seconds). The sockets live in the two
    namespaces; the work runs in threads of this process."""
    import hashlib
    import threading

    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    srv = server_ns.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((server_ip, port))
    srv.listen(1)
    srv.settimeout(timeout)
    received = hashlib.sha256()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                while chunk := conn.recv(1 << 20):
                    received.update(chunk)
        except BaseException as e:  # reported by the caller
            result["error"] = e

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sent = hashlib.sha256()
    block = hashlib.shake_256(b"kubespan").digest(1 << 20)
    start = time.monotonic()
    try:
        cli = client_ns.socket(family, socket.SOCK_STREAM)
        with cli:
            cli.settimeout(timeout)
            if mss:
                cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
            cli.connect((server_ip, port))
            left = nbytes
            i = 0
            while left:
                # vary each block so reordering or duplication would change the hash
                chunk = i.to_bytes(8, "big") + block[8 : min(len(block), left)]
                chunk = chunk[:left]
                cli.sendall(chunk)
                sent.update(chunk)
                left -= len(chunk)
                i += 1
        t.join(timeout)
    finally:
        srv.close()
    elapsed = time.monotonic() - start
    if "error" in result:
        raise RuntimeError(f"receiver failed: {result['error']!r}")
    if t.is_alive():
        raise TimeoutError("receiver did not finish")
    return sent.hexdigest(), received.hexdigest(), elapsed
