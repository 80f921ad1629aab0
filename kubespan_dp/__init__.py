"""kubespan_dp: a userspace WireGuard implementation (a drop-in for wireguard-go)."""
