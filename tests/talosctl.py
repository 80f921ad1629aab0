"""The headers of `talosctl get` tables, which our record tables must print alike."""

from __future__ import annotations

# Every resource's table starts with these; its own print columns follow.
COMMON_COLUMNS = ["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"]
# Talos's peer status columns, then ours: PATH (direct or relayed, control.relay).
PEER_STATUS_HEADER = [*COMMON_COLUMNS, "LABEL", "ENDPOINT", "STATE", "RX", "TX", "PATH"]
