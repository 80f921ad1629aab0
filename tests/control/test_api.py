"""The agent's local API server, in-process on an abstract unix socket (no root needed)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from control.api import ApiServer, ResourceStore, query, socket_address


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


@contextlib.asynccontextmanager
async def serving(allow: bool) -> AsyncIterator[str]:
    """An API server on a fresh link that lets every caller in, or none; yields the link."""
    link = "t" + secrets.token_hex(4)
    server = ApiServer(ResourceStore(), link, allow_uid=lambda uid: allow)
    await server.start()
    try:
        yield link
    finally:
        await server.stop()


async def collect(link: str, rtype: str) -> list[list[dict[str, Any]]]:
    return [records async for records in query(link, rtype)]


def test_refusal_always_reaches_the_caller() -> None:
    """A refused caller reads "permission denied", never a reset connection (50 in a row)."""

    async def main() -> None:
        async with serving(allow=False) as link:
            for _ in range(50):
                with pytest.raises(ValueError, match="permission denied"):
                    await collect(link, "kubespanpeerstatuses")

    run(main())


def test_allowed_caller_gets_records_and_bad_requests_get_errors() -> None:
    async def main() -> None:
        async with serving(allow=True) as link:
            assert await collect(link, "kubespanpeerstatuses") == [[]]
            with pytest.raises(ValueError, match="unknown resource type"):
                await collect(link, "nosuchthing")
            for raw, error in (
                (b"not json\n", "request is not JSON"),
                (b"x" * 70000 + b"\n", "request too long"),
            ):
                reader, writer = await asyncio.open_unix_connection(sock=_connect(link))
                writer.write(raw)
                await writer.drain()
                assert error in (await reader.readline()).decode()
                writer.close()

    run(main())


def _connect(link: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_address(link))
    return sock
