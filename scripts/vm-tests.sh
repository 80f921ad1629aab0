#!/usr/bin/env bash
# Kernel-WireGuard tests: boot Debian's kernel in a virtme-ng VM (no KVM) on the
# host's filesystem and run tests/vm/guest_*.py there. Extra arguments go to pytest
# inside the VM. `./run test` also does this, through tests/vm/test_vm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tests/vm/harness.py "$@"
