"""Watch a cluster on discovery services and print every reply as a JSON line.

    python -m tests.e2e.discovery_watch CLUSTER_ID HOST:PORT [HOST:PORT ...]

Raw gRPC, no decryption: it shows what every node's client receives, in particular
each deletion. The first line per service is its snapshot ("snapshot": true).
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from control.discovery.proto import cluster_pb2 as pb
from control.discovery.proto import cluster_pb2_grpc as pbg


async def watch(cluster_id: str, target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pbg.ClusterStub(channel).Watch(pb.WatchRequest(cluster_id=cluster_id))
        first = True
        async for reply in call:
            line = {
                "service": target,
                "snapshot": first,
                "deleted": reply.deleted,
                "ids": [a.id for a in reply.affiliates],
            }
            print(json.dumps(line), flush=True)
            first = False


async def main(cluster_id: str, targets: list[str]) -> None:
    await asyncio.gather(*(watch(cluster_id, t) for t in targets))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
