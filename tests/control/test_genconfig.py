"""`gen config`: random identity, KubeSpan + discovery on, loads back, never overwrites."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

from control.config import load_config
from control.genconfig import generate_config, main

REPO = Path(__file__).resolve().parents[2]


def test_generated_config_loads_and_is_random() -> None:
    a, b = load_config(generate_config()), load_config(generate_config())
    assert a.kubespan.enabled and a.discovery.service_active
    assert len(base64.urlsafe_b64decode(a.cluster_id)) == 32 and len(a.secret_bytes) == 32
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
