"""The published test vectors in vectors.toml, as attributes: ``VECTORS.rfc8439_aead.key``.

Strings are hex and become bytes; tables become namespaces, arrays lists.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        return bytes.fromhex(value)  # skips the whitespace of multi-line values
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _decode(v) for k, v in value.items()})
    return value


VECTORS = _decode(tomllib.loads(Path(__file__).with_name("vectors.toml").read_text()))
