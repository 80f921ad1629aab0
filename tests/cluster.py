"""A running KubeSpan lab cluster for the end-to-end and VM tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from control.labcluster import LabCluster
from control.netlab import Lab


@contextmanager
def running_cluster(
    workdir: Path,
    prefix: str,
    reconcile_interval: float = 5.0,
    default_mode: str = "userspace",
    discovery_services: int = 1,
) -> Iterator[LabCluster]:
    """A lab with its discovery services running; agents, services and namespaces go on exit."""
    with Lab(prefix) as lab:
        cluster = LabCluster.create(
            lab, workdir, reconcile_interval, default_mode, discovery_services
        )
        try:
            cluster.start_discoveries()
            yield cluster
        finally:
            cluster.close()
