#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine: system packages, a
# virtualenv in .venv, and the package itself (this builds the Cython extension).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(wireguard-go wireguard-tools iperf3 nftables tcpdump iproute2 iputils-ping netcat-openbsd libssl-dev stress-ng
              python3-dev gcc qemu-system-x86 busybox-static linux-image-amd64)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[bootstrap] installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating virtualenv .venv"
    "$PYTHON" -m venv .venv
fi
echo "[bootstrap] installing the package and its test dependencies into .venv"
.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q -e '.[test,bench]' 2>&1 | grep -vE "^WARNING: Location|^\s*$" | grep -iE "error|fail" || true
.venv/bin/python -c "import kubespan_dp._fastpath, kubespan_dp._batch" || { echo "[bootstrap] the fast-path extension did not build" >&2; exit 1; }
echo "[bootstrap] ready"
