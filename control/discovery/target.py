"""Where the discovery service is: its URL as written in a config, turned into a gRPC
target. Used by the config (the service endpoint in effect) and by the client (its
first target and any redirect), so both read a URL the same way. No gRPC import here:
the config loads without it."""

from __future__ import annotations

from urllib.parse import urlsplit

from kubespan_dp.netutil import format_endpoint

SCHEMES = {"http": False, "https": True, "grpc": False, "grpcs": True}  # -> TLS


def parse_discovery_endpoint(endpoint: str, insecure: bool | None = None) -> tuple[str, bool]:
    """(gRPC target 'host:port', use TLS) from 'https://host/', 'http://host:port' or
    'host:port' (a bare host means port 443).

    The scheme decides TLS, as Talos's client does (http is plaintext, default port
    80; https 443); `insecure` overrides it. Raises ValueError."""
    if "://" in endpoint:
        url = urlsplit(endpoint)
        if url.scheme not in SCHEMES or not url.hostname:
            raise ValueError(f"unsupported discovery endpoint {endpoint!r}")
        tls = SCHEMES[url.scheme] if insecure is None else not insecure
        port = url.port or (443 if tls else 80)
        host = url.hostname
    else:
        tls = True if insecure is None else not insecure
        host, sep, port_s = endpoint.rpartition(":")
        if not sep or host.endswith(":") or (":" in host and not host.startswith("[")):
            host, port_s = endpoint, "443"  # bare host or bare IPv6
        host = host.strip("[]")
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"invalid discovery endpoint {endpoint!r}")
        port = int(port_s)
    return format_endpoint((host, port)), tls
