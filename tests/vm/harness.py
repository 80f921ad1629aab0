"""Boot Debian's kernel (which has the WireGuard module) in a virtme-ng VM and run
pytest inside it, on the host's filesystem (read-only root, copy-on-write /tmp, /var,
/etc; /run is a fresh tmpfs, so /var/run/wireguard is the VM's own).

Why a VM: this machine's kernel has no WireGuard module, and kernel mode can only be
proven on a real module. KVM fails here, so qemu emulates (TCG): a boot takes 20-35 s
and Python runs several times slower than on the host.

The guest command prints two marker lines, `KUBESPAN-VM-BOOTED <guest uptime>` when
it starts and `KUBESPAN-VM-RC=<n>` with pytest's exit status; without the second one
the VM never finished its run (boot failure, kernel panic, qemu died) and that is
reported as such instead of as a test result. Output is streamed as it arrives and
the whole run has a hard timeout, after which qemu is killed.

Run from the repo root:  .venv/bin/python tests/vm/harness.py [PYTEST ARGS]
(default: every tests/vm/guest_*.py). Exit status: pytest's, or 124 on timeout,
125 when the VM did not run to the end, 126 when a tool is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
GUEST_TESTS = "tests/vm/guest_*.py"
BOOTED = "KUBESPAN-VM-BOOTED"
RC_MARK = "KUBESPAN-VM-RC="
WG_MODULE = "kernel/drivers/net/wireguard/wireguard.ko"
DEFAULT_TIMEOUT = 2100.0  # seconds for boot + all guest tests (no KVM: ~20 min when quiet)

EXIT_TIMEOUT = 124
EXIT_NO_RESULT = 125
EXIT_MISSING_TOOL = 126


class VmError(RuntimeError):
    """The VM could not be started or did not run to the end."""


class VmTimeout(VmError):
    """The whole run took longer than allowed; qemu was killed."""


@dataclass
class VmResult:
    returncode: int  # the guest command's exit status
    boot_seconds: float  # host wall time until the guest command started
    total_seconds: float
    output: str


def find_kernel() -> Path:
    """A kernel image whose modules include wireguard; Debian's standard one first.

    KUBESPAN_VM_KERNEL overrides the choice.
    """
    if override := os.environ.get("KUBESPAN_VM_KERNEL"):
        path = Path(override)
        if not path.is_file():
            raise VmError(f"KUBESPAN_VM_KERNEL={override} is not a file")
        return path
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if any(modules.glob(WG_MODULE + "*")):
            # Prefer the stock kernel over flavours such as -rt, then the newest.
            candidates.append((("-rt-" not in version, _version_key(version)), image))
    if not candidates:
        raise VmError(
            "no kernel with a wireguard module in /boot: install Debian's linux-image-amd64 "
            "(scripts/bootstrap.sh does)"
        )
    return max(candidates)[1]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def missing_tools() -> list[str]:
    problems = []
    if shutil.which("qemu-system-x86_64") is None:
        problems.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    if not (VENV_BIN / "vng").exists():
        problems.append("vng (PyPI package virtme-ng, in .venv)")
    if shutil.which("busybox") is None:
        problems.append("busybox (Debian package busybox-static)")
    if os.geteuid() != 0:
        problems.append("root (the kernel image in /boot is readable by root only)")
    return problems


def guest_script(pytest_args: list[str]) -> str:
    """What runs inside the VM: pytest from the repo's venv, then the exit marker."""
    args = " ".join(shlex.quote(a) for a in pytest_args)
    return (
        f"echo {BOOTED} $(cut -d' ' -f1 /proc/uptime); "
        # TUN is a module in Debian's kernel and its /dev node only appears once loaded
        # (userspace WireGuard nodes in the VM need it); the rest autoloads.
        "modprobe tun || echo '[vm] modprobe tun failed'; "
        f"cd {shlex.quote(str(REPO))}; "
        "export KUBESPAN_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 "
        f"PATH={shlex.quote(str(VENV_BIN))}:$PATH; "
        f"{shlex.quote(str(VENV_BIN / 'python'))} -m pytest -p no:cacheprovider {args}; "
        f"echo {RC_MARK}$?"
    )


def vng_command(kernel: Path, script: str, memory: str, cpus: int, name: str) -> list[str]:
    return [
        str(VENV_BIN / "vng"),
        "--run",
        str(kernel),
        "--name",
        name,
        "--disable-kvm",  # KVM fails on this machine with an emulation error
        "--memory",
        memory,
        "--cpus",
        str(cpus),
        "--cwd",
        str(REPO),
        "--exec",
        script,
    ]


def run_in_vm(
    pytest_args: list[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory: str = "2G",
    cpus: int = 2,
    out: TextIO | None = None,
    name: str | None = None,
) -> VmResult:
    """Boot the VM, run pytest inside, stream its output to `out`; raise VmError when
    the VM does not produce a result (tools missing, boot failure, timeout)."""
    if problems := missing_tools():
        raise VmError("the VM harness needs: " + "; ".join(problems))
    out = out or sys.stdout
    kernel = find_kernel()
    name = name or f"kubespan-vm-{secrets.token_hex(4)}"  # qemu's -name: findable in ps
    argv = vng_command(kernel, guest_script(pytest_args), memory, cpus, name)
    env = dict(
        os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    )
    print(
        f"[vm] booting {kernel.name} ({cpus} cpus, {memory}, no KVM); timeout {timeout:.0f}s",
        file=out,
        flush=True,
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    lines: deque[str] = deque(maxlen=20000)
    booted: list[float] = []
    rc_seen: list[int] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if line.startswith(BOOTED) and not booted:
                booted.append(time.monotonic() - start)
                print(f"[vm] guest up after {booted[0]:.1f}s", file=out, flush=True)
            elif line.startswith(RC_MARK):
                rc_seen.append(int(line[len(RC_MARK) :].strip() or 255))
            print(line, file=out, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5)
        raise VmTimeout(
            f"the VM run exceeded {timeout:.0f}s and was killed "
            f"(guest {'booted' if booted else 'never booted'})"
        ) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    reader.join(10)
    total = time.monotonic() - start
    output = "\n".join(lines)
    if not rc_seen:
        tail = "\n".join(list(lines)[-30:])
        stage = "ran but did not finish" if booted else "did not boot"
        raise VmError(
            f"the VM {stage} (vng exited {proc.returncode} after {total:.0f}s); "
            f"last output:\n{tail}"
        )
    print(
        f"[vm] guest exit status {rc_seen[-1]}; boot {booted[0]:.1f}s, total {total:.1f}s",
        file=out,
        flush=True,
    )
    return VmResult(rc_seen[-1], booted[0], total, output)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        help=f"arguments for pytest in the VM (default: {GUEST_TESTS} -v)",
    )
    ns = parser.parse_args(argv)
    args = [a for a in ns.pytest_args if a != "--"] or default_args()
    if problems := missing_tools():
        print("[vm] the VM harness needs: " + "; ".join(problems), file=sys.stderr)
        return EXIT_MISSING_TOOL
    try:
        result = run_in_vm(args, timeout=ns.timeout, memory=ns.memory, cpus=ns.cpus)
    except VmTimeout as e:
        print(f"[vm] {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except VmError as e:
        print(f"[vm] {e}", file=sys.stderr)
        return EXIT_NO_RESULT
    return result.returncode


def default_args() -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for p in REPO.glob(GUEST_TESTS))
    return [*files, "-v"]


if __name__ == "__main__":
    sys.exit(main())
