"""control.relay.server without root: the command line and the metrics it exports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from control.config import load_config
from control.relay.core import DROP_REASONS, RelayCore
from control.relay.server import RelayServer, relay_key
from tests import promtext
from tests.netns import VENV_BIN

CONFIG = """\
version: v1alpha1
cluster:
  id: c1
  secret: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
"""


def test_help_explains() -> None:
    out = subprocess.run(
        [str(VENV_BIN / "kubespan"), "relay", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "mac1" in out and "--listen" in out and "--metrics-listen" in out
    assert (
        "relay"
        in subprocess.run([str(VENV_BIN / "kubespan")], capture_output=True, text=True).stdout
    )


def test_needs_cluster_identity(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("version: v1alpha1\ncluster: {}\n")
    r = subprocess.run(
        [str(VENV_BIN / "kubespan"), "relay", "-c", str(config)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "cluster id and secret" in r.stderr


def test_metrics_families() -> None:
    core = RelayCore(relay_key(load_config(CONFIG)))
    core.receive(b"junk", ("192.0.2.1", 1), 0.0)
    server = RelayServer(core)

    class Families(Collector):
        def collect(self) -> Iterable[Metric]:
            return server.families()

    registry = CollectorRegistry()
    registry.register(Families())
    samples = promtext.samples(generate_latest(registry).decode())
    for reason in DROP_REASONS:
        key = promtext.key("kubespan_relay_dropped_packets_total", reason=reason)
        assert samples[key] == (1 if reason == "malformed" else 0)
    assert samples[promtext.key("kubespan_relay_table_entries", table="nodes")] == 0
