"""The agent's end-to-end scenarios with every node in kernel mode (runs inside the VM).

The scenarios are tests/e2e/test_mesh.py's own functions, run here with the
`wg_mode` fixture set to "kernel": full mesh and traffic through the tunnel, endpoint
cycling, and a dead node going down (with and without allowDownPeerBypass) and coming
back. The VM's kernel has the WireGuard module, so no node runs our daemon here.
"""

from __future__ import annotations

import pytest

from tests.e2e import test_mesh as scenarios
from tests.e2e.test_mesh import cluster  # noqa: F401,F811  (the fixture, resolved with our wg_mode)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


@pytest.fixture
def wg_mode() -> str:
    return "kernel"


def test_kernel_full_mesh_and_traffic_through_the_tunnel(cluster) -> None:  # noqa: F811
    scenarios.test_full_mesh_and_traffic_goes_through_the_tunnel(cluster, 3)


def test_kernel_endpoint_cycling(cluster) -> None:  # noqa: F811
    scenarios.test_agent_cycles_to_a_working_endpoint(cluster)


def test_kernel_dead_node_down_bypass_and_back(cluster) -> None:  # noqa: F811
    scenarios.test_dead_node_goes_down_bypass_or_no_leak_and_comes_back(cluster)
