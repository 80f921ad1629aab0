"""TLS credentials that follow their files: a renewed certificate serves new connections.

gRPC asks ``fetch`` at every TLS handshake; it stats both files and, when either changed,
loads the pair, but only once the key matches the certificate (a renewal writes two files,
and a handshake may fall between the writes: until both are new the old pair stays).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("control.discovery.tlsreload")

_Stamp = tuple[tuple[int, int, int], ...]


def _stamp(*paths: Path) -> _Stamp:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM); ValueError if the key is not the certificate's."""
    cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError(f"{key_file} is not the key of {cert_file}")
    return key_pem, cert_pem


class ReloadingCredentials:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self._stamp = _stamp(self.cert_file, self.key_file)
        self._refused: _Stamp | None = None  # files we could not load (warned once)
        self.reloads = 0
        initial = grpc.ssl_server_certificate_configuration(
            [load_pair(self.cert_file, self.key_file)]
        )
        # fetch returns None for "unchanged", as gRPC documents; the type stub wants a value.
        fetch: Callable[[], grpc.ServerCertificateConfiguration] = self.fetch  # type: ignore[assignment]
        self.credentials = grpc.dynamic_ssl_server_credentials(initial, fetch)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """New configuration if the files changed (and make a whole pair), else None."""
        try:
            stamp = _stamp(self.cert_file, self.key_file)
        except OSError:
            return None  # a file missing in the middle of a renewal: keep the current pair
        if stamp in (self._stamp, self._refused):
            return None
        try:
            pair = load_pair(self.cert_file, self.key_file)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("TLS certificate not reloaded (keeping the current one): %s", exc)
            self._refused = stamp
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return grpc.ssl_server_certificate_configuration([pair])
