"""Our daemon on its own: lifecycle, wg-quick, UAPI robustness, garbage input, fwmark, logs."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from control import netlab
from control.backends.uapi_client import UAPIClient
from tests import netns
from tests.netns import INNER4, INNER6, OUTER4

pytestmark = pytest.mark.netns

KUBESPAN_WG = str(netns.VENV_BIN / "kubespan-wg")


def link_exists(ns: netlab.Netns, ifname: str) -> bool:
    return ns.run("ip", "link", "show", ifname, check=False).returncode == 0


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "link deleted", "socket removed"])
def test_stops_and_cleans_up(lab: netns.Lab, how: str) -> None:
    ns = lab.netns()
    d = lab.daemon(ns, "kubespan-wg")
    sock = netns.uapi_path(d.ifname)
    assert link_exists(ns, d.ifname) and sock.exists()
    if how == "SIGTERM":
        d.proc.send_signal(signal.SIGTERM)
    elif how == "SIGINT":
        os.killpg(d.proc.pid, signal.SIGINT)
    elif how == "link deleted":
        ns.run("ip", "link", "del", d.ifname)
    else:
        sock.unlink()
    assert d.proc.wait(10) == 0
    assert not sock.exists()
    assert not link_exists(ns, d.ifname)
    assert "stopped" in d.output()


def test_detaches_like_wireguard_go(lab: netns.Lab) -> None:
    """Without -f the command returns once the interface and socket are ready."""
    ns = lab.netns()
    ifname = netlab.unique_name("wg", 8)
    netlab.LEDGER.sockets.add(netns.uapi_path(ifname))
    r = ns.run(KUBESPAN_WG, ifname, timeout=30)
    assert r.returncode == 0
    pids = ns.pids()
    netlab.LEDGER.pids.update(pids)
    assert len(pids) == 1
    assert netns.uapi_path(ifname).exists() and link_exists(ns, ifname)
    assert "listen_port=" in netns.uapi_request(ifname, "get=1\n\n")
    ns.run("ip", "link", "del", ifname)
    netlab.wait_until(lambda: not netlab.pid_alive(pids[0]), timeout=10, what="daemon to exit")
    assert not netns.uapi_path(ifname).exists()


def test_refuses_a_name_in_use(lab: netns.Lab) -> None:
    ns = lab.netns()
    d = lab.daemon(ns, "kubespan-wg")
    r = ns.run(KUBESPAN_WG, "-f", d.ifname, check=False, timeout=30)
    assert r.returncode != 0
    assert d.alive() and netns.uapi_path(d.ifname).exists()
    r = ns.run(KUBESPAN_WG, "-f", "bad/name", check=False)
    assert r.returncode == 2 and "invalid interface name" in r.stderr


def test_help() -> None:
    r = subprocess.run([KUBESPAN_WG, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "IFNAME" in r.stdout and "WG_QUICK_USERSPACE_IMPLEMENTATION" in r.stdout


# --------------------------------------------------------------------------- wg-quick


def test_wg_quick_up_and_down(lab: netns.Lab) -> None:
    na, nb = lab.netns("qa"), lab.netns("qb")
    va, vb = lab.veth(na, nb)
    netlab.add_address(na, va, f"{OUTER4[0]}/24")
    netlab.add_address(nb, vb, f"{OUTER4[1]}/24")
    keys = [netns.genkey(na), netns.genkey(nb)]
    names = [netlab.unique_name("wq", 8), netlab.unique_name("wq", 8)]
    confdir = lab.tempdir()
    env = {"WG_QUICK_USERSPACE_IMPLEMENTATION": "kubespan-wg"}
    for i, ns in enumerate((na, nb)):
        conf = confdir / f"{names[i]}.conf"
        conf.write_text(
            "[Interface]\n"
            f"PrivateKey = {keys[i][0]}\nListenPort = {51830 + i}\n"
            f"Address = {INNER4[i]}/24, {INNER6[i]}/64\nMTU = 1380\n\n"
            "[Peer]\n"
            f"PublicKey = {keys[1 - i][1]}\nAllowedIPs = {INNER4[1 - i]}/32, {INNER6[1 - i]}/128\n"
            f"Endpoint = {OUTER4[1 - i]}:{51830 + 1 - i}\n"
        )
        conf.chmod(0o600)
        netlab.LEDGER.sockets.add(netns.uapi_path(names[i]))

        def down(ns: netlab.Netns = ns, conf: Path = conf) -> None:
            ns.run("wg-quick", "down", str(conf), check=False, env=env)

        lab.defer(down)
        ns.run("wg-quick", "up", str(conf), env=env)
        netlab.LEDGER.pids.update(ns.pids())
    netns.ping(na, INNER4[1])
    netns.ping(nb, INNER6[0])
    assert "mtu 1380" in na.run("ip", "link", "show", names[0]).stdout
    show = na.run("wg", "show", names[0]).stdout
    assert "latest handshake" in show and keys[1][1] in show
    for i, ns in enumerate((na, nb)):
        pids = ns.pids()
        ns.run("wg-quick", "down", str(confdir / f"{names[i]}.conf"), env=env)

        def exited(pids: list[int] = pids) -> bool:
            return not any(netlab.pid_alive(p) for p in pids)

        netlab.wait_until(
            exited,
            timeout=10,
            what="daemon to exit after wg-quick down",
        )
        assert not netns.uapi_path(names[i]).exists()
        assert not link_exists(ns, names[i])


# --------------------------------------------------------------------------- UAPI robustness


def configured(lab: netns.Lab) -> tuple[netlab.Netns, netns.Daemon]:
    ns = lab.netns()
    d = lab.daemon(ns, "kubespan-wg")
    keyfile = lab.tempdir() / "key"
    keyfile.write_text(netns.genkey(ns)[0] + "\n")
    _, peer = netns.genkey(ns)
    netns.wg(
        ns,
        "set",
        d.ifname,
        "private-key",
        str(keyfile),
        "listen-port",
        "51820",
        "fwmark",
        "0x20",
        "peer",
        peer,
        "allowed-ips",
        "10.1.0.0/16,fd01::/64",
        "endpoint",
        "192.168.1.1:51820",
        "persistent-keepalive",
        "25",
    )
    return ns, d


K = "ab" * 32
MALFORMED = [
    "set=1\nlisten_port=70000\n\n",
    "set=1\nlisten_port=abc\n\n",
    "set=1\nfwmark=-1\n\n",
    "set=1\nprivate_key=1234\n\n",
    "set=1\nreplace_peers=yes\n\n",
    "set=1\nnot_a_key=1\n\n",
    # valid changes before the bad line must not be applied either
    f"set=1\nlisten_port=4000\nreplace_peers=true\npublic_key={K}\nallowed_ip=10.0.0.0/99\n\n",
    f"set=1\nprivate_key={K}\npublic_key={K}\nendpoint=nohost:1\n\n",
    f"set=1\npublic_key={K}\npersistent_keepalive_interval=1\nprotocol_version=7\n\n",
    f"set=1\npublic_key={K}\nremove=maybe\n\n",
    f"set=1\npublic_key={K}\nlisten_port=1\n\n",
    f"set=1\npublic_key={K[:-2]}zz\n\n",
    "set=1\nlisten_port=1\xff\n\n",
    "get=1\ntrailing\n\n",
]


def test_malformed_requests_answer_einval_and_change_nothing(lab: netns.Lab) -> None:
    ns, d = configured(lab)
    before = netns.uapi_request(d.ifname, "get=1\n\n")
    assert before.endswith("errno=0\n\n")
    for request in MALFORMED:
        reply = netns.uapi_request(d.ifname, request)
        assert reply == "errno=-22\n\n", (request, reply)
        assert netns.uapi_request(d.ifname, "get=1\n\n") == before, request
    # a line without '=' is a protocol error, as in wireguard-go
    assert netns.uapi_request(d.ifname, "set=1\ngarbage\n\n") == "errno=-71\n\n"
    # an unknown operation closes the connection without a reply
    assert netns.uapi_request(d.ifname, "delete=1\n\n") == ""
    # a line longer than any valid one
    assert (
        netns.uapi_request(d.ifname, "set=1\nlisten_port=" + "1" * 100000 + "\n\n")
        == "errno=-22\n\n"
    )
    assert netns.uapi_request(d.ifname, "get=1\n\n") == before
    assert d.alive()


def test_several_requests_on_one_connection(lab: netns.Lab) -> None:
    ns, d = configured(lab)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(netns.uapi_path(d.ifname)))
        s.sendall(b"set=1\nlisten_port=abc\n\nset=1\nlisten_port=4242\n\nget=1\n\n")
        buf = b""
        s.settimeout(10)
        while buf.count(b"errno=") < 3:
            buf += s.recv(65536)
    text = buf.decode()
    assert text.startswith("errno=-22\n\nerrno=0\n\n")
    assert "listen_port=4242" in text


def test_port_in_use_answers_eaddrinuse(lab: netns.Lab) -> None:
    ns, d = configured(lab)
    before = netns.uapi_request(d.ifname, "get=1\n\n")
    blocker = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with blocker:
        blocker.bind(("0.0.0.0", 4711))
        reply = netns.uapi_request(d.ifname, f"set=1\nlisten_port=4711\nprivate_key={K}\n\n")
        assert reply == "errno=-98\n\n"
    assert netns.uapi_request(d.ifname, "get=1\n\n") == before
    assert netns.uapi_request(d.ifname, "set=1\nlisten_port=4711\n\n") == "errno=0\n\n"
    assert "listen_port=4711" in netns.uapi_request(d.ifname, "get=1\n\n")


def test_uapi_round_trip_with_wg(lab: netns.Lab) -> None:
    ns, d = configured(lab)
    conf = netns.wg(ns, "showconf", d.ifname)
    assert "ListenPort = 51820" in conf and "FwMark = 0x20" in conf
    assert "AllowedIPs = 10.1.0.0/16, fd01::/64" in conf and "PersistentKeepalive = 25" in conf
    netns.wg(ns, "setconf", d.ifname, "/dev/stdin", input=conf)
    assert netns.wg(ns, "showconf", d.ifname) == conf
    # replace everything with an empty config, then restore it
    netns.wg(ns, "setconf", d.ifname, "/dev/stdin", input="[Interface]\n")
    assert (
        netns.wg(ns, "show", d.ifname, "peers") == "\n"
        or not netns.wg(ns, "show", d.ifname, "peers").strip()
    )
    netns.wg(ns, "syncconf", d.ifname, "/dev/stdin", input=conf)
    assert netns.wg(ns, "showconf", d.ifname) == conf


# --------------------------------------------------------------------------- garbage on the wire


def garbage(rng: random.Random) -> list[bytes]:
    out = [rng.randbytes(rng.randrange(0, 200)) for _ in range(300)]
    for mtype, size in ((1, 148), (2, 92), (3, 64), (4, 32), (4, 100)):
        hdr = struct.pack("<I", mtype)
        out += [hdr + rng.randbytes(size - 4) for _ in range(100)]  # right size, bad MACs/index
        out += [hdr + rng.randbytes(size + 1 - 4) for _ in range(20)] if mtype != 4 else []
    out += [struct.pack("<I", 1 | (1 << 8)) + bytes(144)] * 20  # reserved bytes set
    out.append(b"\x04" + bytes(65000))
    return out


@pytest.mark.parametrize(
    "kinds",
    [("kubespan-wg", "wireguard-go"), ("kubespan-wg", "kubespan-wg")],
    ids=["ours-wggo", "ours-ours"],
)
def test_garbage_datagrams_are_dropped_and_counted(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    handshake = a.dump()[1][4]
    datagrams = garbage(random.Random(7))
    for family, target in ((socket.AF_INET, OUTER4[0]), (socket.AF_INET6, netns.OUTER6[0])):
        with b.ns.socket(family, socket.SOCK_DGRAM) as s:
            for i, d in enumerate(datagrams):
                s.sendto(d, (target, a.port))
                if i % 50 == 0:
                    time.sleep(0.005)  # do not overrun the receive buffer on purpose
    # (read with the agent's UAPI client, as `kubespan` and the test lab do)
    stats = UAPIClient(netns.uapi_path(a.ifname)).stats()
    counts = {k: int(v) for k, v in stats.items()}
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped_"))
    assert dropped >= 2 * len(datagrams) - 10, stats
    assert a.daemon.alive()
    netns.ping(a.ns, INNER4[1])
    netns.ping(b.ns, INNER6[0])
    assert a.dump()[1][4] == handshake, "the session must survive garbage"


# --------------------------------------------------------------------------- fwmark and logs


def test_fwmark_marks_our_udp_packets(lab: netns.Lab) -> None:
    a, b = netns.build_pair(lab, "kubespan-wg", "wireguard-go")
    a.wg("set", a.ifname, "fwmark", "0x20")
    a.ns.run(
        "nft",
        "-f",
        "-",
        input=(
            "table inet t {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
            f"  udp sport {a.port} meta mark 0x20 counter\n"
            f"  udp sport {a.port} meta mark != 0x20 counter\n }}\n}}\n"
        ),
    )
    netns.ping(a.ns, INNER4[1], count=5)
    rules = a.ns.run("nft", "list", "chain", "inet", "t", "out").stdout
    marked, unmarked = [
        int(line.split("packets ")[1].split()[0])
        for line in rules.splitlines()
        if "counter packets" in line
    ]
    assert marked >= 5 and unmarked == 0, rules
    assert "fwmark: 0x20" in a.wg("show", a.ifname)


def test_keys_never_logged(lab: netns.Lab) -> None:
    psk = base64.b64encode(os.urandom(32)).decode()
    a, b = netns.build_pair(lab, "kubespan-wg", "kubespan-wg", psk=psk)
    netns.ping(a.ns, INNER4[1])
    a.wg("set", a.ifname, "peer", b.public_key, "remove")
    netns.uapi_request(a.ifname, f"set=1\nprivate_key={'cd' * 32}\npublic_key=zz\n\n")
    secrets = []
    for key in (a.private_key, b.private_key, psk):
        raw = base64.b64decode(key)
        secrets += [key, raw.hex(), key[:20]]
    for host in (a, b):
        host.daemon.stop()
        out = host.daemon.output()
        assert "interface" in out
        for s in secrets + ["cd" * 32]:
            assert s not in out, f"a key appears in the log of {host.ifname}"


def valid_mac1_initiation(responder_public: bytes, rng: random.Random) -> bytes:
    """An initiation with random content but a correct mac1: it passes the cheap
    check and costs the responder a Diffie-Hellman before it fails."""
    import hashlib

    mac1_key = hashlib.blake2s(b"mac1----" + responder_public).digest()
    body = struct.pack("<I", 1) + rng.randbytes(4 + 32 + 48 + 28)
    mac1 = hashlib.blake2s(body, key=mac1_key, digest_size=16).digest()
    return body + mac1 + bytes(16)


def test_handshake_flood_puts_device_under_load(lab: netns.Lab) -> None:
    """A backlog of handshakes makes the device answer with cookie replies instead of
    doing the expensive work; existing sessions carry on and load passes."""
    a, b = netns.build_pair(lab, "kubespan-wg", "wireguard-go")
    netns.ping(a.ns, INNER4[1])
    handshake = a.dump()[1][4]
    flood = [
        valid_mac1_initiation(base64.b64decode(a.public_key), random.Random(i)) for i in range(3000)
    ]
    cookies = 0
    with b.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for d in flood:
            s.sendto(d, (OUTER4[0], a.port))
        s.settimeout(5)
        try:
            while True:
                reply = s.recv(2048)
                if len(reply) == 64 and reply[0] == 3:
                    cookies += 1
        except TimeoutError:
            pass
    stats = netns.uapi_request(a.ifname, "stats=1\n\n")
    assert cookies > 0, stats
    assert "dropped_under_load_cookie_sent=" in stats
    netns.ping(a.ns, INNER4[1])
    assert a.dump()[1][4] == handshake
    # once the backlog is gone, a fresh handshake goes through without cookies
    a.wg("set", a.ifname, "peer", b.public_key, "remove")
    a.set_peer(b, f"{INNER4[1]}/32", f"{OUTER4[1]}:{b.port}")
    netns.ping(a.ns, INNER4[1])
