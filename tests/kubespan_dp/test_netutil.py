"""The shared rules in kubespan_dp.netutil: interface names and endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubespan_dp.netutil import (
    EndpointError,
    InterfaceNameError,
    check_endpoint,
    check_ifname,
    parse_endpoint,
    valid_ifname,
)
from kubespan_dp.uapisock import socket_path

GOOD_NAMES = ["kubespan", "a", "x" * 15, "wg-0_1.2", "eth0@x", "é" * 7, "a%b", "a\x01b", "..."]
BAD_NAMES = [
    ("", "empty"),
    ("x" * 16, "longer than 15 bytes"),
    ("é" * 8, "longer than 15 bytes"),  # 16 bytes in UTF-8
    (".", "reserved"),
    ("..", "reserved"),
    ("a/b", "contains"),
    ("a:b", "contains"),
    ("a b", "contains"),
    ("a\tb", "contains"),
    ("a\vb", "contains"),
    ("a\x00b", "contains"),
    ("à", "contains"),  # UTF-8 C3 A0: the kernel's isspace() takes 0xA0
    ("\udc80", "not UTF-8"),
    (None, "not a string"),
    (b"wg0", "not a string"),
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_linux_accepts(name: str) -> None:
    assert check_ifname(name) == name and valid_ifname(name)


@pytest.mark.parametrize("name,why", BAD_NAMES)
def test_linux_refuses(name: object, why: str) -> None:
    with pytest.raises(InterfaceNameError, match=f"^invalid interface name .*: .*{why}"):
        check_ifname(name)
    assert not valid_ifname(name)


def test_socket_path_checks_the_name() -> None:
    assert socket_path("wg0") == Path("/var/run/wireguard/wg0.sock")
    assert socket_path("wg0", Path("/tmp/x")) == Path("/tmp/x/wg0.sock")
    with pytest.raises(InterfaceNameError, match="contains"):
        socket_path("../../etc/x")


@pytest.mark.parametrize(
    "text,endpoint",
    [
        ("192.0.2.1:51820", ("192.0.2.1", 51820)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
        ("[2001:DB8:0::1]:65535", ("2001:db8::1", 65535)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
        ("[::ffff:192.0.2.1]:7", ("192.0.2.1", 7)),  # as IPv4: the v6 socket is v6-only
    ],
)
def test_parse_endpoint(text: str, endpoint: tuple[str, int]) -> None:
    assert parse_endpoint(text) == endpoint


@pytest.mark.parametrize(
    "text,why",
    [
        ("192.0.2.1", "expected ip:port"),
        ("::1:5", "expected ip:port"),
        ("[::1]", "expected ip:port"),
        ("[::1]5", "expected ip:port"),
        ("192.0.2.1:0", "port '0' is not in 1-65535"),
        ("192.0.2.1:65536", "port '65536' is not in 1-65535"),
        ("192.0.2.1:+1", "port '\\+1' is not in 1-65535"),
        ("192.0.2.1: 1", "port ' 1' is not in 1-65535"),
        ("192.0.2.1:", "port '' is not in 1-65535"),
        ("host:1", "'host' is not an IP address"),
        ("[host]:1", "'host' is not an IP address"),
        ("[192.0.2.1]:1", "brackets are only for IPv6"),
    ],
)
def test_parse_endpoint_refuses(text: str, why: str) -> None:
    with pytest.raises(EndpointError, match=why):
        parse_endpoint(text)


def test_check_endpoint() -> None:
    assert check_endpoint(("2001:DB8::1", 5)) == ("2001:db8::1", 5)
    assert check_endpoint(("::ffff:10.0.0.1", 5)) == ("10.0.0.1", 5)
    for bad, why in [
        ("192.0.2.1:5", "expected \\(ip, port\\)"),
        (("192.0.2.1",), "expected \\(ip, port\\)"),
        (("192.0.2.1", 0), "port 0 is not"),
        (("192.0.2.1", 65536), "port 65536 is not"),
        (("192.0.2.1", True), "port True is not"),
        (("192.0.2.1", "5"), "port '5' is not"),
        ((3232235777, 5), "3232235777 is not an IP address"),
        (("not-an-ip", 5), "'not-an-ip' is not an IP address"),
    ]:
        with pytest.raises(EndpointError, match=why):
            check_endpoint(bad)
