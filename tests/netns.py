"""Shared helpers for tests that build hosts out of network namespaces.

A `Lab` owns everything a test creates (namespaces, veth pairs, daemons, files)
and tears it down in reverse order, also when the test fails. Every name carries
a random suffix so parallel runs do not collide; WireGuard interface names must
be unique per host because /var/run/wireguard is shared by all namespaces.

`LEDGER` remembers every namespace, UAPI socket and process any Lab created in
this interpreter, so a session finalizer can prove nothing was left behind
(`leftovers()`).

Other parts of the project may append helpers at the end of this file.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
WG_RUN_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15
CLONE_NEWNET = 0x40000000

_ALPHABET = string.ascii_lowercase + string.digits


def unique_name(prefix: str, length: int = 6) -> str:
    """`prefix` plus a random suffix, cut to fit an interface name."""
    tail = "".join(secrets.choice(_ALPHABET) for _ in range(length))
    return prefix[: max(0, IFNAMSIZ - length)] + tail


def require_facilities() -> None:
    """Fail loudly (never skip) when the machine cannot run namespace tests."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun missing")
    for tool in ("ip", "wg", "wireguard-go", "nft"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not installed")
    if problems:
        raise RuntimeError("netns tests need: " + "; ".join(problems))


# --------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    namespaces: set[str] = field(default_factory=set)
    sockets: set[Path] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)

    def leftovers(self) -> list[str]:
        found = []
        live_ns = set(list_namespaces())
        found += [f"namespace {n}" for n in sorted(self.namespaces & live_ns)]
        found += [f"socket {p}" for p in sorted(self.sockets) if p.exists()]
        found += [f"process {p}" for p in sorted(self.pids) if _pid_alive(p)]
        return found


LEDGER = Ledger()


def leftovers() -> list[str]:
    return LEDGER.leftovers()


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Netns:
    """A named network namespace (`ip netns add`), with loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        LEDGER.namespaces.add(name)
        self.run("ip", "link", "set", "lo", "up")

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(env),
            input=input,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"[{self.name}] {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def popen(
        self, args: Sequence[str], env: dict[str, str] | None = None, **kw
    ) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.argv(args), env=_env(env), start_new_session=True, **kw)
        LEDGER.pids.add(proc.pid)
        return proc

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread inside the namespace (for socket())."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (namespace is fixed at creation)."""
        with self.entered():
            return socket.socket(family, type)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def delete(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                _kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if _pid_alive(p)]
                time.sleep(0.05)
            if not pids:
                break
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    if extra:
        env.update(extra)
    return env


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- WireGuard daemons


def uapi_path(ifname: str) -> Path:
    return WG_RUN_DIR / f"{ifname}.sock"


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


@dataclass
class Daemon:
    """A WireGuard userspace daemon (wireguard-go or ours) running in the foreground."""

    ns: Netns
    ifname: str
    proc: subprocess.Popen
    kind: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the daemon printed (only after it stopped)."""
        if self.proc.stdout is None or self.alive():
            return ""
        return self.proc.stdout.read().decode(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        return self.proc.returncode


def start_daemon(ns: Netns, ifname: str, kind: str, env: dict[str, str] | None = None) -> Daemon:
    """Start `wireguard-go` or `kubespan-wg` in the foreground inside `ns`."""
    if kind == "wireguard-go":
        argv = ["wireguard-go", "-f", ifname]
    elif kind == "kubespan-wg":
        argv = [str(VENV_BIN / "kubespan-wg"), "-f", ifname]
    else:
        raise ValueError(kind)
    LEDGER.sockets.add(uapi_path(ifname))
    # wireguard-go logs only with LOG_LEVEL set; ours logs at info by default.
    proc = ns.popen(argv, env={"LOG_LEVEL": "verbose", **(env or {})})
    daemon = Daemon(ns, ifname, proc, kind)
    try:
        wait_for_uapi(ifname, proc=proc)
    except BaseException:
        daemon.stop()
        raise
    return daemon


# --------------------------------------------------------------------------- the lab


class Lab:
    """Owns every resource a test creates; `close()` removes them, newest first."""

    def __init__(self) -> None:
        require_facilities()
        self._cleanups: list[Callable[[], object]] = []
        self.errors: list[str] = []

    def defer(self, fn: Callable[[], object]) -> None:
        self._cleanups.append(fn)

    def netns(self, prefix: str = "ks") -> Netns:
        ns = Netns(unique_name(f"{prefix}-", 8))
        self.defer(ns.delete)
        return ns

    def veth(
        self, a: Netns, b: Netns, name_a: str | None = None, name_b: str | None = None
    ) -> tuple[str, str]:
        """A veth pair with one end in each namespace, both up (no addresses)."""
        name_a = name_a or unique_name("va", 6)
        name_b = name_b or unique_name("vb", 6)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                name_a,
                "netns",
                a.name,
                "type",
                "veth",
                "peer",
                "name",
                name_b,
                "netns",
                b.name,
            ],
            check=True,
            capture_output=True,
        )
        a.run("ip", "link", "set", name_a, "up")
        b.run("ip", "link", "set", name_b, "up")
        return name_a, name_b

    def daemon(
        self, ns: Netns, kind: str, ifname: str | None = None, env: dict[str, str] | None = None
    ) -> Daemon:
        ifname = ifname or unique_name("wg", 8)
        d = start_daemon(ns, ifname, kind, env)
        self.defer(d.stop)
        return d

    def tempdir(self) -> Path:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="ks-lab-"))
        self.defer(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def close(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning; report at the end
                self.errors.append(f"{fn!r}: {e!r}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_address(ns: Netns, dev: str, cidr: str) -> None:
    extra = ["nodad"] if ":" in cidr else []
    ns.run("ip", "addr", "add", cidr, "dev", dev, *extra)


def wg(ns: Netns, *args: str, input: str | None = None) -> str:
    return ns.run("wg", *args, input=input).stdout


def wait_until(
    pred: Callable[[], object], timeout: float = 20, interval: float = 0.1, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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
class WgHost:
    ns: Netns
    daemon: Daemon
    private_key: str  # base64, as `wg` wants it
    public_key: str
    port: int
    veth: str

    @property
    def ifname(self) -> str:
        return self.daemon.ifname

    def wg(self, *args: str, input: str | None = None) -> str:
        return wg(self.ns, *args, input=input)

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
) -> tuple[WgHost, WgHost]:
    """Two namespaces joined by a veth (v4+v6 outer addresses), each with a WireGuard
    daemon of the given kind, configured with stock `wg` as peers of each other, with
    inner addresses INNER4/INNER6. `outer` ("4" or "6") picks the endpoint family."""
    ns = [lab.netns("wa"), lab.netns("wb")]
    veths = lab.veth(ns[0], ns[1])
    for i in range(2):
        add_address(ns[i], veths[i], f"{OUTER4[i]}/24")
        add_address(ns[i], veths[i], f"{OUTER6[i]}/64")
    hosts = []
    for i, kind in enumerate((kind_a, kind_b)):
        d = lab.daemon(ns[i], kind)
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
) -> tuple[str, str, float]:
    """Send `nbytes` of random-looking data over TCP from client_ns to server_ns.

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
