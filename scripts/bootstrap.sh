#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine: system packages, a
# virtualenv in .venv, and the package itself (this builds the Cython extension).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(wireguard-tools iperf3 nftables tcpdump iproute2 iputils-ping netcat-openbsd libssl-dev stress-ng
              python3-dev gcc qemu-system-x86 busybox-static linux-image-amd64 haproxy)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
updated=
apt_update() {  # at most once per run
    if [ -z "$updated" ]; then apt-get update -qq; updated=1; fi
}
if [ ${#missing[@]} -gt 0 ]; then
    echo "[bootstrap] installing Debian packages: ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# wireguard-go: the modern one (UDP GSO/GRO, TUN offloads) from bookworm-backports is
# /usr/bin/wireguard-go, the anchor every run measures against; bookworm's own
# 0.0.20220316 (no offloads) is unpacked into .cache/ for the interop tests.
# control/netlab/wggo.py is where both are looked up.
BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.sources
OLD_WGGO_DIR=.cache/wireguard-go-old
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
    echo "[bootstrap] enabling Debian bookworm-backports ($BACKPORTS)"
    keyring=$(sed -n 's/^Signed-By: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}" > "$BACKPORTS"
    apt_update
fi
# backports versions end in ~bpo12+N: when that is installed there is nothing to do
if ! dpkg-query -W -f='${Status} ${Version}\n' wireguard-go 2>/dev/null | grep -q "^install ok installed .*~bpo12"; then
    echo "[bootstrap] installing wireguard-go from bookworm-backports"
    apt_update
    # pinned for this one package: `-t bookworm-backports` would upgrade others too
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-go/bookworm-backports >/dev/null
fi
# valkey-server 8 (the discovery service's shared store in the HA tests) is only in
# bookworm-backports; pinned per package for the same reason as wireguard-go.
if ! dpkg-query -W -f='${Status} ${Version}\n' valkey-server 2>/dev/null | grep -q "^install ok installed .*~bpo12"; then
    echo "[bootstrap] installing valkey-server from bookworm-backports"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valkey-server/bookworm-backports >/dev/null
fi
if [ ! -x "$OLD_WGGO_DIR/usr/bin/wireguard-go" ]; then
    apt_update
    old=$(apt-cache madison wireguard-go | awk -F' *[|] *' '$3 ~ / bookworm\/main / {print $2; exit}')
    [ -n "$old" ] || { echo "[bootstrap] bookworm main has no wireguard-go" >&2; exit 1; }
    echo "[bootstrap] unpacking bookworm's wireguard-go $old into $OLD_WGGO_DIR"
    tmp=$(mktemp -d)
    chmod 755 "$tmp"  # apt fetches as user _apt
    (cd "$tmp" && apt-get download -qq "wireguard-go=$old" 2>/dev/null)
    rm -rf "$OLD_WGGO_DIR"
    mkdir -p "$OLD_WGGO_DIR"
    dpkg-deb -x "$tmp"/wireguard-go_*.deb "$OLD_WGGO_DIR"
    rm -rf "$tmp"
    "$OLD_WGGO_DIR/usr/bin/wireguard-go" --version >/dev/null
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
