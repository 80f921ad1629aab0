"""A running KubeSpan lab cluster for the end-to-end and VM tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from control.labcluster import LabCluster
from control.netlab import Lab


@contextmanager
def running_cluster(
    workdir: Path, prefix: str, reconcile_interval: float = 5.0, default_mode: str = "userspace"
) -> Iterator[LabCluster]:
    """A lab with the discovery service running; agents, service and namespaces go on exit."""
    with Lab(prefix) as lab:
        cluster = LabCluster.create(lab, workdir, reconcile_interval, default_mode)
        try:
            cluster.start_discovery()
            yield cluster
        finally:
            cluster.close()
