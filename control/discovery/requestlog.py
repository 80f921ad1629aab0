"""One line per request (``--log-requests``), JSON, on the logger control.discovery.requests.

    {"method": "Hello", "code": "OK", "ms": 0.4, "client": "203.0.113.9",
     "cluster": "3f2a9c1e", "client_version": "v1.9.3"}

The cluster ID lets anyone watch a cluster's (encrypted) affiliates, so the line carries a
short hash of it: enough to tell clusters apart, not to join one. A Watch is logged when
its stream ends, with the stream's lifetime.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger("control.discovery.requests")


def cluster_tag(cluster_id: str) -> str:
    return hashlib.sha256(cluster_id.encode()).hexdigest()[:8]


def log_request(method: str, code: str, seconds: float, client: str | None, request: Any) -> None:
    line: dict[str, object] = {
        "method": method,
        "code": code,
        "ms": round(seconds * 1000, 3),
        "client": client,
    }
    cluster_id = getattr(request, "cluster_id", None)
    if isinstance(cluster_id, str) and cluster_id:
        line["cluster"] = cluster_tag(cluster_id)
    affiliate_id = getattr(request, "affiliate_id", None)
    if isinstance(affiliate_id, str) and affiliate_id:
        line["affiliate"] = affiliate_id
    version = getattr(request, "client_version", None)
    if isinstance(version, str) and version:
        line["client_version"] = version[:64]
    log.info("%s", json.dumps(line, separators=(", ", ": ")))
