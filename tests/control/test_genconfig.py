"""`gen config`: Talos 1.14 layout, random identity, KubeSpan + discovery on, loads back,
never overwrites."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control.agent import main as agent_main
from control.config import POD_CIDRS_HELP, DiscoveryService, load_config
from control.genconfig import generate_config, main

REPO = Path(__file__).resolve().parents[2]


def test_generated_config_loads_and_is_random() -> None:
    a, b = load_config(generate_config()), load_config(generate_config())
    assert a.kubespan.enabled and a.discovery.service_active
    assert len(base64.b64decode(a.cluster_id)) == 32 and len(a.secret_bytes) == 32
    assert a.cluster_id != b.cluster_id and a.cluster_secret != b.cluster_secret


def test_options_carry_through() -> None:
    cfg = load_config(
        generate_config(
            discovery_endpoint="http://10.0.0.1:3000",
            listen_port=51999,
            wireguard_mode="userspace",
            pod_cidrs=["10.244.1.0/24"],
            advertise_kubernetes_networks=True,
            extra_endpoints=["1.2.3.4:5"],
        )
    )
    assert cfg.discovery_target() == ("10.0.0.1:3000", True)
    assert cfg.local.listen_port == 51999 and cfg.local.wireguard_mode == "userspace"
    assert cfg.kubespan.advertise_kubernetes_networks
    assert cfg.kubespan.extra_announced_endpoints == (("1.2.3.4", 5),)


def test_written_in_talos_1_14_layout() -> None:
    """Documents instead of cluster.id/secret/discovery and machine.network.kubespan."""
    docs = list(
        yaml.safe_load_all(
            generate_config(discovery_endpoint=["http://10.0.0.1:3000", "https://d2.example/"])
        )
    )
    assert docs[0] == {"version": "v1alpha1", "machine": {"type": "worker"}}
    assert [d.get("kind") for d in docs[1:]] == [
        "DiscoveryServiceConfig",
        "DiscoveryServiceConfig",
        "DiscoveryIdentityConfig",
        "KubeSpanConfig",
        "KubeSpanPyConfig",
    ]
    assert (docs[1]["name"], docs[2]["name"]) == ("default", "service-2")
    cfg = load_config(yaml.safe_dump_all(docs))
    assert cfg.discovery_services == (
        DiscoveryService("default", "http://10.0.0.1:3000", "10.0.0.1:3000", True),
        DiscoveryService("service-2", "https://d2.example/", "d2.example:443", False),
    )
    cp = load_config(generate_config(machine_type="controlplane"))
    assert cp.node.control_plane and cp.node.api_server_port == 6443


def test_help_says_where_pod_cidrs_come_from(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the text
    for main_function in (main, agent_main):
        with pytest.raises(SystemExit):
            main_function(["--help"])
        assert POD_CIDRS_HELP in capsys.readouterr().out


def test_main_writes_0600_and_refuses_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cluster.yaml"
    assert main(["-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    before = out.read_text()
    assert main(["-o", str(out)]) == 1
    assert out.read_text() == before
    assert main(["--mtu", "1000"]) == 2
    assert "kubespan link MTU must be at least 1280" in capsys.readouterr().err


def test_module_runs_standalone() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "control.genconfig", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--discovery-endpoint" in proc.stdout
