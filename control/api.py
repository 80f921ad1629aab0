"""The running agent's local API: read-only resource queries over a unix socket.

The socket lives in the abstract namespace (`@kubespan/<link>`), which Linux scopes to
the network namespace: each node of a namespace lab has its own, and `ip netns exec
NODE kubespan get ...` reaches the right agent. Abstract sockets have no file mode, so
the server checks the caller's uid with SO_PEERCRED and serves root only.

Protocol: one JSON request line `{"get": TYPE, "watch": bool}`; the server answers with
JSON lines `{"type": TYPE, "records": [...]}` (one, or one per change with watch) or
`{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

from control import records

log = logging.getLogger(__name__)

RESOURCE_TYPES = tuple(kind.aliases[0] for kind in records.KINDS)
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 10.0  # seconds a caller has to send its request line


def socket_address(link: str) -> str:
    return f"\0kubespan/{link}"


def canonical_type(name: str) -> str | None:
    try:
        return records.kind_by_name(name).aliases[0]
    except KeyError:
        return None


def record_to_wire(record: records.Record, node: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "version": record.version,
        "namespace": record.namespace,
        "node": node,
        "spec": dict(record.spec),
    }


def record_from_wire(rtype: str, doc: dict[str, Any]) -> records.Record:
    return records.Record(
        records.kind_by_name(rtype),
        doc["id"],
        doc["spec"],
        doc["version"],
        doc.get("namespace", records.NAMESPACE),
        doc.get("node", ""),
    )


class ResourceStore:
    """The agent's current records per type; watchers are woken on every change."""

    def __init__(self) -> None:
        self._records: dict[str, list[dict[str, Any]]] = {t: [] for t in RESOURCE_TYPES}
        self._changed = asyncio.Condition()

    def get(self, rtype: str) -> list[dict[str, Any]]:
        return self._records[rtype]

    async def set(self, rtype: str, records: list[dict[str, Any]]) -> None:
        if records == self._records[rtype]:
            return
        self._records[rtype] = records
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self) -> None:
        async with self._changed:
            await self._changed.wait()


class ApiServer:
    def __init__(
        self,
        store: ResourceStore,
        link: str,
        *,
        allow_uid: Callable[[int], bool] = lambda uid: uid == 0,
    ) -> None:
        self.store = store
        self.address = socket_address(link)
        self._allow_uid = allow_uid
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Read the request before answering, refusals included: closing with the
            # caller's request unread resets the connection and the caller would see
            # "connection lost" instead of our answer.
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except ValueError:  # longer than the stream's limit
                line = b"x" * (MAX_REQUEST + 1)
            if not self._allow_uid(_peer_uid(writer)):
                await self._send(
                    writer, {"error": "permission denied: the KubeSpan API serves root only"}
                )
                return
            request = _parse_request(line)
            if "error" in request:
                await self._send(writer, request)
                return
            rtype, watch = request["get"], request["watch"]
            await self._send(writer, {"type": rtype, "records": self.store.get(rtype)})
            while watch:
                await self.store.wait_change()
                await self._send(writer, {"type": rtype, "records": self.store.get(rtype)})
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()


def _peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _parse_request(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_REQUEST:
        return {"error": "request too long"}
    try:
        request = json.loads(line)
    except ValueError:
        return {"error": "request is not JSON"}
    if not isinstance(request, dict) or not isinstance(request.get("get"), str):
        return {"error": 'request must be {"get": TYPE, "watch": bool}'}
    rtype = canonical_type(request["get"])
    if rtype is None:
        return {
            "error": f"unknown resource type {request['get']!r}; known: {', '.join(RESOURCE_TYPES)}"
        }
    return {"get": rtype, "watch": bool(request.get("watch", False))}


async def query(link: str, rtype: str, watch: bool = False) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield the records of one type (once, or on every change with watch)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_address(link))
    except OSError as exc:
        sock.close()
        raise ConnectionError(
            f"no KubeSpan agent answers for link {link!r} in this network namespace "
            f"({exc.strerror})"
        ) from None
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(json.dumps({"get": rtype, "watch": watch}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            message = json.loads(line)
            if "error" in message:
                raise ValueError(message["error"])
            yield message["records"]
            if not watch:
                return
    finally:
        writer.close()
