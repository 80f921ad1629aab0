"""The standard gRPC health service (grpc.health.v1) of the discovery service.

Both the whole server ("") and the Cluster service report SERVING once the service is
up. ``set_serving(False)`` is the hook for whatever the service depends on (the server
reports NOT_SERVING while a shared store cannot be reached); a shutdown turns both to
NOT_SERVING for good, so a load balancer stops sending new clients while the running
calls drain.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

CLUSTER_SERVICE = "sidero.discovery.server.Cluster"


class Health:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = True

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", CLUSTER_SERVICE):
            await self.servicer.set(service, status)

    async def shutdown(self) -> None:
        self.serving = False
        await self.servicer.enter_graceful_shutdown()
