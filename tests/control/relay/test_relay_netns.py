"""`kubespan relay` between two unmodified wireguard-go peers that cannot reach each other.

    wa (10.81.1.2) --- relay (10.81.1.1 | 10.81.2.1 | 10.81.3.1) --- wb (10.81.2.2)
                                         |
                                   evil (10.81.3.2)

The relay namespace does not forward IP, so the only way between wa and wb is the relay
process. Each peer's endpoint is the relay's address on its side; each registers every
second from its WireGuard port (as the agent does every 20 s).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from control.netlab import Netns, add_address, wait_until
from control.relay import registration
from tests import netns, promtext
from tests.netns import VENV_BIN, WgHost

pytestmark = pytest.mark.netns

CLUSTER_ID = "relay-test-cluster"
SECRET = bytes(range(32))
KEY = registration.registration_key(CLUSTER_ID, SECRET)
RELAY_PORT = 51821
WA_IP, WB_IP, EVIL_IP = "10.81.1.2", "10.81.2.2", "10.81.3.2"
RELAY_FOR_A, RELAY_FOR_B, RELAY_FOR_EVIL = "10.81.1.1", "10.81.2.1", "10.81.3.1"
INNER_A, INNER_B = "10.77.0.1", "10.77.0.2"
CONFIG = f"""\
version: v1alpha1
cluster:
  id: {CLUSTER_ID}
  secret: {base64.b64encode(SECRET).decode()}
"""


@dataclass
class Registrar:
    """Registers both peers with the relay every second, like the agent's loop."""

    hosts: list[WgHost]
    sent: dict[str, bytes] = field(default_factory=dict)  # the last message per host
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for host, relay_ip in zip(self.hosts, (RELAY_FOR_A, RELAY_FOR_B), strict=True):
            t = threading.Thread(target=self._run, args=(host, relay_ip), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, host: WgHost, relay_ip: str) -> None:
        public = base64.b64decode(host.public_key)
        with host.ns.entered():
            while not self._stop.is_set():
                now_ns = time.time_ns()
                registration.register(host.port, [(relay_ip, RELAY_PORT)], KEY, public, now_ns)
                self.sent[host.public_key] = registration.encode(KEY, public, now_ns)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@dataclass
class RelayLab:
    lab: netns.Lab
    relay_ns: Netns
    evil: Netns
    a: WgHost
    b: WgHost
    config: Path
    metrics_port: int
    capture_log: Path
    relay: subprocess.Popen | None = None
    registrar: Registrar | None = None

    def start_relay(self) -> None:
        argv = [
            str(VENV_BIN / "kubespan"),
            "relay",
            "--config",
            str(self.config),
            "--listen",
            f"0.0.0.0:{RELAY_PORT}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
        ]
        self.relay = self.relay_ns.popen(argv, log=self.config.with_suffix(".log"))
        wait_until(self._metrics_up, timeout=30, what="the relay's metrics")

    def _metrics_up(self) -> bool:
        try:
            self.metrics()
        except OSError:
            assert self.relay is not None and self.relay.poll() is None, "relay exited"
            return False
        return True

    def stop_relay(self) -> int:
        assert self.relay is not None
        self.relay.send_signal(signal.SIGTERM)
        code = self.relay.wait(30)
        self.relay = None
        return code

    def metrics(self) -> dict[promtext.SampleKey, float]:
        with self.relay_ns.entered():
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return promtext.samples(r.read().decode())

    def dropped(self, reason: str) -> float:
        return self.metrics()[promtext.key("kubespan_relay_dropped_packets_total", reason=reason)]

    def forwarded(self, kind: str) -> float:
        return self.metrics()[promtext.key("kubespan_relay_forwarded_packets_total", type=kind)]


def _wg_host(lab: netns.Lab, ns: Netns, dev: str, relay_ip: str, inner: str) -> WgHost:
    daemon = lab.daemon(ns, "wireguard-go")
    private, public = netns.genkey(ns)
    host = WgHost(ns, daemon, private, public, 51820, dev)
    keyfile = lab.tempdir() / "key"
    keyfile.write_text(private + "\n")
    host.wg("set", daemon.ifname, "private-key", str(keyfile), "listen-port", "51820")
    add_address(ns, daemon.ifname, f"{inner}/24")
    ns.run("ip", "link", "set", daemon.ifname, "mtu", "1420", "up")
    return host


@pytest.fixture
def relay_lab(lab: netns.Lab) -> Iterator[RelayLab]:
    wa, relay_ns, wb, evil = (lab.netns(n) for n in ("wa", "relay", "wb", "evil"))
    for peer, ip, relay_ip in ((wa, WA_IP, RELAY_FOR_A), (wb, WB_IP, RELAY_FOR_B)):
        dev, rdev = lab.veth(peer, relay_ns)
        add_address(peer, dev, f"{ip}/24")
        add_address(relay_ns, rdev, f"{relay_ip}/24")
    edev, erdev = lab.veth(evil, relay_ns)
    add_address(evil, edev, f"{EVIL_IP}/24")
    add_address(relay_ns, erdev, f"{RELAY_FOR_EVIL}/24")
    relay_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    a = _wg_host(lab, wa, dev, RELAY_FOR_A, INNER_A)
    b = _wg_host(lab, wb, dev, RELAY_FOR_B, INNER_B)
    a.set_peer(b, f"{INNER_B}/32", f"{RELAY_FOR_A}:{RELAY_PORT}")
    b.set_peer(a, f"{INNER_A}/32", f"{RELAY_FOR_B}:{RELAY_PORT}")

    tmp = lab.tempdir()
    config = tmp / "relay.yaml"
    config.write_text(CONFIG)
    capture_log = tmp / "capture.txt"
    capture = relay_ns.popen(
        ["tcpdump", "-i", "any", "-nn", "-l", "-tt", "-Q", "inout", "udp"], log=capture_log
    )
    lab.defer(capture.terminate)
    wait_until(lambda: "listening on" in capture_log.read_text(), what="tcpdump to start")
    rl = RelayLab(lab, relay_ns, evil, a, b, config, 9471, capture_log)
    rl.start_relay()
    registrar = Registrar([a, b])
    registrar.start()
    lab.defer(registrar.stop)
    lab.defer(lambda: rl.relay is not None and rl.stop_relay())
    rl.registrar = registrar
    yield rl


def test_relayed_ping_and_tcp(relay_lab: RelayLab) -> None:
    rl = relay_lab
    netns.ping(rl.a.ns, INNER_B)
    netns.ping(rl.b.ns, INNER_A)
    nbytes = 32 << 20
    sent, received, seconds = netns.tcp_transfer(rl.b.ns, rl.a.ns, INNER_B, nbytes)
    assert sent == received
    print(f"relayed TCP: {nbytes * 8 / seconds / 1e6:.0f} Mbit/s")
    assert rl.forwarded("initiation") >= 1 and rl.forwarded("response") >= 1
    assert rl.forwarded("data") > nbytes / 1500
    # Both peers see the relay as their peer's endpoint (it is the only way).
    assert rl.a.dump()[1][2] == f"{RELAY_FOR_A}:{RELAY_PORT}"
    assert rl.b.dump()[1][2] == f"{RELAY_FOR_B}:{RELAY_PORT}"


def _live_receiver_index(rl: RelayLab) -> int:
    """The receiver index of the data wb sends now (read off the relay's interface)."""
    with rl.relay_ns.entered():
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    with sniff:
        sniff.settimeout(1)
        pinger = rl.b.ns.popen(["ping", "-i", "0.2", INNER_A])
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    packet = sniff.recv(2048)
                except TimeoutError:
                    continue
                ihl = (packet[0] & 15) * 4
                if packet[9] != socket.IPPROTO_UDP or packet[12:16] != socket.inet_aton(WB_IP):
                    continue
                payload = packet[ihl + 8 :]
                if len(payload) >= 32 and payload[0] == 4:
                    return int(struct.unpack_from("<I", payload, 4)[0])
        finally:
            pinger.terminate()
            pinger.wait()
    raise TimeoutError("no data from wb seen on the relay")


def test_hostile_datagrams_dropped_and_never_reflected(relay_lab: RelayLab) -> None:
    rl = relay_lab
    netns.ping(rl.a.ns, INNER_B)
    index = _live_receiver_index(rl)
    assert rl.registrar is not None
    replayed = rl.registrar.sent[rl.a.public_key]
    a_public = base64.b64decode(rl.a.public_key)
    forged_key = registration.registration_key(CLUSTER_ID, bytes(32))
    initiation = struct.pack("<II", 1, 7) + os.urandom(140)  # mac1 for nobody
    hostile = {
        "malformed": [os.urandom(n) for n in (1, 20, 31, 100, 500, 1400)],
        "bad_registration": [registration.encode(forged_key, a_public, time.time_ns())],
        "stale_registration": [replayed],
        "unknown_recipient": [initiation],
        "unknown_index": [struct.pack("<IIQ", 4, index ^ 0x5A5A5A5A, 0) + bytes(64)],
        "wrong_source": [struct.pack("<IIQ", 4, index, 1 << 40) + bytes(64)],
    }
    before = {reason: rl.dropped(reason) for reason in hostile}
    with rl.evil.entered():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for datagrams in hostile.values():
                for d in datagrams:
                    s.sendto(d, (RELAY_FOR_EVIL, RELAY_PORT))

    def all_counted() -> bool:
        return all(rl.dropped(r) >= before[r] + len(d) for r, d in hostile.items())

    wait_until(all_counted, what="every hostile datagram dropped and counted")
    # The replay did not move wa: the pair still works through the relay.
    netns.ping(rl.a.ns, INNER_B)
    netns.ping(rl.b.ns, INNER_A)

    # Every datagram the relay sent went to an address that had sent it something before.
    talked: set[str] = set()
    sent_to: list[str] = []
    port = rf"\.{RELAY_PORT}"
    pattern = re.compile(r"IP (\d+\.\d+\.\d+\.\d+\.\d+) > (\d+\.\d+\.\d+\.\d+\.\d+): UDP")
    for line in rl.capture_log.read_text().splitlines():
        m = pattern.search(line)
        if not m:
            continue
        src, dst = m.groups()
        if re.search(port + "$", dst):
            talked.add(src)
        elif re.search(port + "$", src):
            assert dst in talked, f"the relay sent to {dst} before hearing from it: {line}"
            sent_to.append(dst)
    assert sent_to, "the capture saw no relayed traffic"
    assert not [d for d in sent_to if d.startswith(EVIL_IP + ".")]


def test_relay_restart_pair_recovers(relay_lab: RelayLab) -> None:
    rl = relay_lab
    netns.ping(rl.a.ns, INNER_B)
    assert rl.stop_relay() == 0  # a clean shutdown on SIGTERM

    def ping_fails() -> bool:
        r = rl.a.ns.run("ping", "-c", "1", "-W", "1", INNER_B, check=False)
        return r.returncode != 0

    wait_until(ping_fails, timeout=30, what="the pair to go down without the relay")
    rl.start_relay()
    # Nothing else restarted: the peers re-handshake through the new relay process
    # (WireGuard retries when its data goes unanswered), after the next registration.
    netns.ping(rl.a.ns, INNER_B, timeout=90)
    netns.ping(rl.b.ns, INNER_A)
