"""Child processes that die with their supervisor, whatever signal it gets (``fedmm server``, ``fedmm site``).

A supervisor that gets SIGKILL runs no cleanup code: without help its children (Flower's
SuperLink, a site's SuperNode and ClientApp executor, each in its own session) would keep
running as orphans, still training. On Linux every child is therefore started through a
small guard, ``python -m fedmm.runtime.supervise SUPERVISOR_PID -- COMMAND...``:

1. the guard asks the kernel for SIGTERM when its parent dies
   (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), then re-checks ``os.getppid()``: a supervisor that
   died before that call is noticed, and the command is never started;
2. it starts the command in a process group of its own, the command itself also under
   ``PR_SET_PDEATHSIG`` (so a guard killed with SIGKILL still takes the command down);
3. on SIGTERM, SIGINT or SIGHUP (its supervisor stopping it, or dying) it passes the signal
   to that whole group, waits up to :data:`GRACE` seconds, then SIGKILLs the group;
4. when the command has ended, whatever is left of its group (grandchildren the command
   started without a session of their own, e.g. a SuperNode's ``flower-superexec`` and
   ``flwr-clientapp`` processes) is SIGKILLed, and the guard exits with the command's status.

The guard is a process of its own rather than a ``preexec_fn``: ``preexec_fn`` is unsafe in a
supervisor with threads, and the parent-death signal is sent when the *thread* that started
the child ends. The guard is single-threaded, so its own ``preexec_fn`` is safe.

Grandchildren in a session of their own are out of the group's reach: the SuperLink's
``flower-superexec`` (Flower starts it detached) watches its parent's PID (``--parent-pid``)
and exits within about 0.2 s of the SuperLink's end; the ServerApp and ClientApp processes
it starts watch it the same way.

Elsewhere (macOS, Windows) there is no parent-death signal: the command is started as
before, in a session of its own, and a supervisor killed with SIGKILL leaves it running
(stop it yourself; a clean stop, SIGTERM or Ctrl-C, still stops every child).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

__all__ = ["GRACE", "guarded", "spawn", "supervise"]

GRACE = 8.0  # seconds a stopped command gets before its group is SIGKILLed (the supervisor waits 10)
_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")


def _set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def guarded(command: Sequence[str]) -> list[str]:
    """``command`` behind the guard of this module (Linux), or unchanged (elsewhere)."""
    if not _LINUX:
        return list(command)
    return [sys.executable, "-m", "fedmm.runtime.supervise", str(os.getpid()), "--", *command]


def spawn(command: Sequence[str], *, env: Mapping[str, str] | None = None, **popen: object) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own, guarded so that it dies with this process (see the module)."""
    return subprocess.Popen(guarded(command), env=None if env is None else dict(env), start_new_session=True, **popen)  # type: ignore[call-overload]


def supervise(processes: Sequence[tuple[str, subprocess.Popen[bytes]]]) -> int:
    """Wait until one process ends (or SIGTERM/SIGINT arrives), then stop them all; return an exit code.

    Every process must lead its own process group (:func:`spawn` does that).
    """
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while not stopping["signal"]:
            ended = [(name, p) for name, p in processes if p.poll() is not None]
            if ended:
                name, process = ended[0]
                code = process.returncode or 1
                print(f"[fedmm] {name} exited with code {process.returncode}; stopping the rest", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        for _, process in processes:
            if process.poll() is None:
                _killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE + 2
        for _, process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(process.pid, signal.SIGKILL)
                process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _guard(supervisor: int, command: list[str]) -> int:
    """The guard's life (see the module): returns the command's exit status."""
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != supervisor:  # the supervisor died before prctl: start nothing
        return 128 + signal.SIGTERM
    guard = os.getpid()
    stop: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        if not stop and child is not None:
            _killpg(child.pid, signum)
        stop.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def in_child() -> None:  # runs in the forked command before exec; the guard has no threads
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != guard:
            os._exit(128 + signal.SIGTERM)

    child = subprocess.Popen(command, process_group=0, preexec_fn=in_child)  # noqa: PLW1509 (single-threaded guard)
    if stop:  # a signal arrived while the command was being started
        _killpg(child.pid, stop[0])
    deadline: float | None = None
    while True:
        if stop and deadline is None:
            deadline = time.monotonic() + GRACE
        try:
            code = child.wait(0.2)
            break
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                _killpg(child.pid, signal.SIGKILL)
    _killpg(child.pid, signal.SIGKILL)  # what the command left behind in its group
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedmm.runtime.supervise SUPERVISOR_PID -- COMMAND...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print("usage: python -m fedmm.runtime.supervise SUPERVISOR_PID -- COMMAND...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(_guard(int(args[0]), args[2:]))


if __name__ == "__main__":
    main()
