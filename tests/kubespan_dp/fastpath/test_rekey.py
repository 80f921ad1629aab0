"""Rekeying in real time through the C packet loop: after REKEY_AFTER_TIME (120 s) the
initiator negotiates a new session while traffic flows, and not one packet is lost.

The pairs run side by side so the test costs one rekey interval, not five.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from tests import netns
from tests.netns import INNER4

pytestmark = [pytest.mark.netns, pytest.mark.timeout(400)]

# against both wireguard-go builds (netns.WGGO_KINDS: modern and old)
PAIRS = [
    ("kubespan-wg", "kubespan-wg"),
    *[("kubespan-wg", k) for k in netns.WGGO_KINDS],
    *[(k, "kubespan-wg") for k in netns.WGGO_KINDS],
]
REKEY_AFTER_TIME = 120
OBSERVE = REKEY_AFTER_TIME + 45


@pytest.fixture(autouse=True)
def fastpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")


def latest_handshake(host: netns.WgHost, peer: netns.WgHost) -> int:
    row = next(r for r in host.dump()[1:] if r[0] == peer.public_key)
    return int(row[4])


def test_rekey_after_120s_loses_no_packet(lab: netns.Lab) -> None:
    pairs = [
        netns.build_pair(lab, *kinds, ports=(51820 + 2 * i, 51821 + 2 * i))
        for i, kinds in enumerate(PAIRS)
    ]
    for a, _b in pairs:
        netns.ping(a.ns, INNER4[1])  # a initiates: a is the side that rekeys on age
    first = [latest_handshake(a, b) for a, b in pairs]
    pingers = [
        subprocess.Popen(
            a.ns.argv(["ping", "-i", "0.2", "-W", "2", INNER4[1]]),
            stdout=subprocess.PIPE,
            text=True,
        )
        for a, _b in pairs
    ]
    time.sleep(OBSERVE)
    results = []
    for proc in pingers:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert match, out
        results.append((int(match.group(1)), int(match.group(2))))
    for (a, b), before, (sent, received), kinds in zip(pairs, first, results, PAIRS, strict=True):
        after = latest_handshake(a, b)
        assert after - before >= REKEY_AFTER_TIME - 5, f"{kinds}: no rekey ({before} -> {after})"
        assert sent > OBSERVE * 4, (kinds, sent)
        assert received == sent, f"{kinds}: {sent - received} of {sent} pings lost across the rekey"
