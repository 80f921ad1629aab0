"""Regenerate the committed *_pb2*.py modules from the .proto files here.

    python -m control.discovery.proto.generate           # rewrite the modules
    python -m control.discovery.proto.generate --check   # exit 1 if any is stale

The .proto files are compiled with the repository root as include path, so the
generated modules import each other as ``control.discovery.proto.x_pb2``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parents[2]
PROTOS = ("cluster.proto", "affiliate.proto", "storage.proto")


def _generate_into(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the generated files, relative to out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rel = PROTO_DIR.relative_to(REPO_ROOT)
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(rel / name) for name in PROTOS),
    ]
    # protoc resolves the .proto paths against the include path, i.e. the repo root.
    import os

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed with status {rc}")
    gen_dir = out_dir / rel
    return sorted(p.relative_to(gen_dir) for p in gen_dir.iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated modules that differ from what protoc produces now."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stale = []
        gen_dir = out / PROTO_DIR.relative_to(REPO_ROOT)
        for name in _generate_into(out):
            committed = PROTO_DIR / name
            if not committed.exists() or committed.read_bytes() != (gen_dir / name).read_bytes():
                stale.append(str(name))
        return stale


def regenerate() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        gen_dir = out / PROTO_DIR.relative_to(REPO_ROOT)
        names = _generate_into(out)
        for name in names:
            (PROTO_DIR / name).write_bytes((gen_dir / name).read_bytes())
        return [str(n) for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    ns = parser.parse_args(argv)
    if ns.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for name in regenerate():
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
