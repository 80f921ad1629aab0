"""The agent as an operator meets it: CLI output formats, watch, API access, metrics,
JSON logs, config errors, the systemd unit."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from control.labcluster import LabCluster, NodeOptions
from tests.cluster import running_cluster
from tests.promtext import key, samples
from tests.talosctl import PEER_STATUS_HEADER

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN, nftables)")
    with running_cluster(tmp_path, "kso", reconcile_interval=2) as c:
        yield c


def read_until(proc: subprocess.Popen, done: Callable[[str], bool], timeout: float) -> str:
    """What `proc` prints on stdout until `done(text so far)` holds; fails after `timeout`."""
    assert proc.stdout is not None
    text, deadline = "", time.monotonic() + timeout
    while not done(text):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"output never got there; so far: {text!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            text += os.read(proc.stdout.fileno(), 65536).decode()
    return text


def test_get_formats_watch_metrics_json_logs_and_root_only_api(cluster: LabCluster) -> None:
    first = cluster.add_node(NodeOptions())
    cluster.start_agent(first, "--metrics-listen", "127.0.0.1:9101", "--log-json")
    second = cluster.add_node(NodeOptions())
    deadline = time.monotonic() + 30
    while True:  # until the first agent answers
        try:
            assert cluster.get(first, "kubespanpeerspecs") == []
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    # Watch the peer specs of the first node before the second node exists.
    watch = subprocess.Popen(
        first.host.ns.argv(
            [
                sys.executable,
                "-m",
                "control.cli",
                "get",
                "kubespanpeerspecs",
                "--watch",
                "--link",
                first.link,
            ]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The watch prints the current set first (a table with only its header, as the
        # second node does not exist yet): from then on it is surely watching.
        first_print = read_until(watch, lambda text: "\n" in text, timeout=30)
        assert first_print.startswith("NODE") and "node2" not in first_print
        cluster.start_agent(second)
        cluster.wait_full_mesh(timeout=60)
        later = read_until(watch, lambda text: "node2" in text, timeout=30)
    finally:
        watch.terminate()
        watch.communicate(timeout=10)
    rows = [line.split() for line in later.splitlines() if not line.startswith("NODE")]
    assert any(len(cells) > 5 and cells[5] == "node2" for cells in rows), later  # LABEL

    # Table, YAML and JSON agree on the peer.
    table = cluster.get_table(first, "kubespanpeerstatuses").splitlines()
    assert table[0].split() == PEER_STATUS_HEADER
    assert "node2" in table[1] and " up " in table[1]
    as_yaml = first.host.run(
        sys.executable,
        "-m",
        "control.cli",
        "get",
        "kubespanidentities",
        "-o",
        "yaml",
        "--link",
        first.link,
    ).stdout
    identity = yaml.safe_load(as_yaml)
    assert identity["metadata"]["type"] == "KubeSpanIdentities.kubespan.talos.dev"
    assert identity["spec"]["wireguardMode"] == "userspace"
    assert identity["spec"]["privateKey"] == "(redacted)"

    # Metrics: per-peer state and counters, reconcile duration.
    metrics = first.host.run(
        "python3",
        "-c",
        "import urllib.request;print(urllib.request.urlopen("
        "'http://127.0.0.1:9101/metrics', timeout=5).read().decode())",
    ).stdout
    got = samples(metrics)
    ups = {
        dict(labels)["label"]: v for (name, labels), v in got.items() if name == "kubespan_peer_up"
    }
    assert ups == {"node2": 1}
    assert key("kubespan_reconcile_duration_seconds") in got
    assert any(name == "kubespan_peer_receive_bytes" for name, _ in got)

    # JSON logs: every line of the first agent's log is a JSON object, and no key leaks.
    log_lines = [line for line in cluster.agent_log(first).splitlines() if line.startswith("{")]
    assert log_lines and all(json.loads(line)["msg"] for line in log_lines)
    state = yaml.safe_load((first.state_dir / "kubespan-identity.yaml").read_text())
    assert state["privateKey"] not in cluster.agent_log(first)
    assert oct((first.state_dir / "kubespan-identity.yaml").stat().st_mode & 0o777) == "0o600"

    # The API serves root only.
    denied = first.host.run(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-m",
        "control.cli",
        "get",
        "kubespanpeerstatuses",
        "--link",
        first.link,
        check=False,
    )
    assert denied.returncode == 1 and "permission denied" in denied.stderr


def test_bad_config_is_refused_with_every_problem_and_changes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "version": "v1alpha1",
                "machine": {"network": {"kubespan": {"enabled": True, "mtu": 1000, "bogus": 1}}},
                "cluster": {"id": "abc", "secret": "not-base64!", "discovery": {"enabled": True}},
            }
        )
    )
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    proc = subprocess.run(
        [sys.executable, "-m", "control.cli", "agent", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "machine.network.kubespan.mtu" in proc.stderr
    assert "machine.network.kubespan.bogus" in proc.stderr
    assert "cluster.secret" in proc.stderr
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == before


def test_cli_help_and_systemd_unit() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "control.cli", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "discovery-service" in out.stdout and "get TYPE" in out.stdout
    agent_help = subprocess.run(
        [sys.executable, "-m", "control.cli", "agent", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert "--metrics-listen" in agent_help.stdout and "--log-json" in agent_help.stdout
    unit = (REPO / "deploy" / "kubespan.service").read_text()
    assert "ExecStart=/usr/local/bin/kubespan agent --config" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode == 0:
        check = subprocess.run(
            ["systemd-analyze", "verify", str(REPO / "deploy" / "kubespan.service")],
            capture_output=True,
            text=True,
        )
        assert "Unknown key" not in check.stderr and "Invalid" not in check.stderr, check.stderr
