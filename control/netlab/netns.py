"""One named network namespace, and running commands and processes inside it."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from control.netlab.ledger import LEDGER, pid_alive

CLONE_NEWNET = 0x40000000
# Commands installed next to this interpreter (kubespan-wg in the virtualenv) come
# first, also when the caller did not put the virtualenv on PATH.
SCRIPTS_DIR = sysconfig.get_path("scripts")

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its output."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with text output; raise LabError with its output if it fails."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=_env(env), input=input
    )
    if check:
        _check(proc, " ".join(argv))
    return proc


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise LabError(
            f"{what} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )


def missing_facilities(tools: Iterable[str] = ("ip",)) -> list[str]:
    """What this machine lacks to build a lab with `tools`: root, TUN, the tools."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun missing")
    problems += [f"{tool} not installed" for tool in tools if shutil.which(tool) is None]
    return problems


def stop_processes(processes: Iterable[subprocess.Popen[Any]], grace: float = 5.0) -> None:
    """SIGTERM each process group, then SIGKILL what still runs after `grace` seconds."""
    processes = list(processes)
    for proc in processes:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class Netns:
    """A named network namespace (`ip netns add`) with loopback up.

    Processes started with `popen` are remembered; `delete` stops them gracefully, then
    kills whatever else still runs inside (a daemon whose parent was killed, say).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[Any]] = []
        run(["ip", "netns", "add", name])
        LEDGER.namespaces.add(name)
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    def argv(self, args: Sequence[str]) -> list[str]:
        """`args` wrapped to run inside the namespace (`ip netns exec` execs, same pid)."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = run(self.argv(args), check=False, timeout=timeout, env=env, input=input)
        if check:
            _check(proc, f"[{self.name}] {' '.join(args)}")
        return proc

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def popen(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: str | Path | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start a process inside the namespace in a session of its own (so a signal to
        its group reaches its children). Output goes to `log` (appended) unless `kw`
        redirects it; without either it is discarded, since a pipe nobody reads would
        block a chatty process."""
        out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL
        kw.setdefault("stdout", out)
        kw.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(self.argv(args), env=_env(env), start_new_session=True, **kw)
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own copy
        LEDGER.pids.add(proc.pid)
        self.processes.append(proc)
        return proc

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread inside the namespace (sockets, TUN devices)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (a socket's namespace is fixed at creation)."""
        with self.entered():
            return socket.socket(family, type)

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in out.stdout.split()]

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process in the namespace; returns their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def delete(self, grace: float = 5.0) -> None:
        try:
            stop_processes(self.processes, grace)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.kill(sig)
                deadline = time.monotonic() + grace
                while pids and time.monotonic() < deadline:
                    pids = [p for p in pids if pid_alive(p)]
                    time.sleep(0.05)
                if not pids:
                    break
        finally:
            run(["ip", "netns", "del", self.name], check=False)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{SCRIPTS_DIR}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env.update(extra or {})
    return env


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
