#!/usr/bin/env bash
# Build the C fast path once with AddressSanitizer (into a scratch copy of the
# package; the worktree's own build is left alone) and run the fast-path tests on it:
#   scripts/asan.sh [pytest args...]      (default: tests/kubespan_dp/fastpath/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d /tmp/ks-asan.XXXXXX)
trap 'rm -rf "$out"' EXIT
flags="-fsanitize=address -fno-omit-frame-pointer -g -O1"
# pip builds in isolation (its own Cython), with the sanitizer flags from the env
CFLAGS="$flags" LDFLAGS="-fsanitize=address" \
    .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir -w "$out/wheel" . >/dev/null
.venv/bin/python - "$out" <<'PY'
import glob, shutil, sys, zipfile
out = sys.argv[1]
skip = shutil.ignore_patterns("*.so", "__pycache__", "*.c")
for tree in ("kubespan_dp", "control", "tests"):
    # (the tests' own C sources, e.g. faults.c, come along: only built C stays behind)
    ignore = skip if tree == "kubespan_dp" else shutil.ignore_patterns("__pycache__")
    shutil.copytree(tree, f"{out}/{tree}", ignore=ignore)
shutil.copy("pyproject.toml", out)
(wheel,) = glob.glob(f"{out}/wheel/*.whl")
with zipfile.ZipFile(wheel) as z:
    # every extension (_fastpath, _batch, ...): none may come from the worktree's build
    sos = [n for n in z.namelist() if n.startswith("kubespan_dp/") and n.endswith(".so")]
    assert any("/_fastpath" in n for n in sos) and any("/_batch" in n for n in sos), sos
    for so in sos:
        z.extract(so, out)
PY
# A venv of its own that sees .venv's packages (pytest, hypothesis, ...) but not the
# editable install's import hook, which would load the worktree's build instead.
python3 -m venv --without-pip "$out/venv"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own=$("$out/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$own/ks-asan-deps.pth"
py="$out/venv/bin/python"
ln -s "$PWD/.venv" "$out/.venv"     # the netns tests start daemons from .venv/bin
ln -s "$PWD/.cache" "$out/.cache"   # bookworm's old wireguard-go (control/netlab/wggo.py)
repo=$PWD
cd "$out"                           # the copy is the repository the tests see
libasan=$(gcc -print-file-name=libasan.so)
export PYTHONPATH="$out${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export KS_ASAN_BUILD="$out"         # tests/netns.py checks our daemons run this build
# the interpreter is not instrumented: the runtime has to come first
LD_PRELOAD="$libasan" "$py" - <<'PY'
import kubespan_dp._batch as bt
import kubespan_dp._fastpath as fp
for mod in (fp, bt):
    assert "/ks-asan." in mod.__file__, mod.__file__
    assert b"__asan_report" in open(mod.__file__, "rb").read(), "not instrumented"
    print("ASan build:", mod.__file__)
PY
if [ $# -eq 0 ]; then set -- tests/kubespan_dp/fastpath/; fi
# test paths are given relative to the repository; the copy has the same layout
[ -d "$repo" ]
# Daemons the netns tests start inherit LD_PRELOAD and PYTHONPATH, so they run the
# ASan build too (.venv's python, but the copy comes first on sys.path); a daemon
# that crashed or printed an ASan report fails its test (tests/netns.py).
LD_PRELOAD="$libasan" "$py" -m pytest -q -p no:cacheprovider "$@"
