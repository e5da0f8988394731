"""Processes by identity, and a reaper that outlives the node to stop what it started.

A pid names a process only while that process lives: once it dies and is reaped, the
kernel hands the number to the next process that starts. A list of pids read from /proc and
signalled seconds later can hit a stranger. So a process here is ``Proc(pid, start)``, with
its start time (clock ticks since boot, field 22 of /proc/PID/stat) read when it was
listed, and every signal goes through ``signal_proc``, which sends nothing unless the pid
still has that start time. Where the kernel offers pidfds (Linux 5.3+), the pidfd is
opened *before* the start time is compared, so the signal reaches the checked process even
if the pid were recycled in between.

hivemind's DHT process, and the p2pd it spawns, outlive a node killed with SIGKILL: nothing
runs in the node to stop them, they are re-parented, and p2pd keeps its ports. Neither
PR_SET_PDEATHSIG in the DHT process (it would take the DHT down, but the setting is
cleared on fork, so p2pd would still be orphaned) nor a process group (a shell puts the
node in a job with `tee` and friends) is a good fit. Instead ``start`` launches this file
as a small separate interpreter that only watches: while ``getppid()`` is the node, it
lists every few seconds the processes it guards (the DHT's tree, never the node's other
children: in a user's program, or in pytest, those are theirs) and what runs under them;
when the node is gone (re-parenting changes ``getppid()``; pid reuse cannot fool it), it
stops those, SIGTERM then SIGKILL. It imports only the standard library, so it starts in
tens of milliseconds and costs a few MB. It ignores SIGINT: a Ctrl-C in a terminal reaches
the whole foreground group, and stopping the helpers is then the node's own job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple


class Proc(NamedTuple):
    pid: int
    start: int  # clock ticks since boot: together with the pid, names one process


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (after the command name, which may hold spaces
    and parentheses), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def identify(pid: int) -> Proc | None:
    """The process that has ``pid`` now, or None."""
    fields = _stat(pid)
    return Proc(pid, int(fields[19])) if fields else None


def alive(proc: Proc) -> bool:
    """True while ``proc`` (that pid *and* that start time) runs; a zombie is not alive."""
    fields = _stat(proc.pid)
    return fields is not None and int(fields[19]) == proc.start and fields[0] != "Z"


def descendants(*roots: int) -> list[Proc]:
    """Every live process under any of ``roots`` (Linux /proc; elsewhere: none found),
    parents before their children."""
    children: dict[int, list[Proc]] = {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:  # (os.listdir and _stat: about three times faster than Path.glob)
        fields = _stat(pid)
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(Proc(pid, int(fields[19])))
    out: list[Proc] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child.pid)
    return out


def signal_proc(proc: Proc, sig: int) -> bool:
    """Send ``sig`` to ``proc`` if it is still that process; False if it is gone (or its
    pid now belongs to another process, which is left alone)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfds here: check, then kill by pid
        pidfd = None
    try:
        if not alive(proc):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pidfd is None:
                os.kill(proc.pid, sig)
            else:
                signal.pidfd_send_signal(pidfd, sig)
            return True
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def terminate(procs: list[Proc], grace: float = 3.0) -> list[Proc]:
    """SIGTERM each of ``procs`` still running, SIGKILL those left after ``grace`` seconds;
    returns any that outlived both (which should be none)."""
    left = list(procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in left if signal_proc(p, sig)]
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if alive(p)]
        if not left:
            break
    return left


# --- the reaper process ----------------------------------------------------------------


def start(known: list[Proc], *, relist: float = 5.0) -> subprocess.Popen:
    """Launch a reaper for this process that guards ``known`` (a helper and its tree, say
    the DHT process and p2pd) and whatever those start later; nothing else of ours.
    ``relist``: see ``watch``."""
    args = [str(relist), *(f"{p.pid}:{p.start}" for p in known)]
    # -I -S: only the standard library, none of the node's environment; stdout closed so a
    # reader of the node's output is not kept waiting; stderr kept for a traceback.
    return subprocess.Popen([sys.executable, "-I", "-S", __file__, str(os.getpid()), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _grown(known: list[Proc]) -> list[Proc]:
    """Those of ``known`` still alive, then whatever runs under them now."""
    roots = [p for p in known if alive(p)]
    return roots + [p for p in descendants(*(p.pid for p in roots)) if p not in roots]


def watch(parent: int, known: list[Proc], *, period: float = 0.1, relist: float = 5.0,
          grace: float = 3.0) -> None:
    """Until ``parent`` dies, keep the list of ``known`` and what runs under them; then
    stop them.

    ``period``: how soon after the parent's death we act. ``relist``: how often to read
    all of /proc (a few ms each time) for helpers started since; those started under a
    helper we already know are found at the end anyway."""
    next_list = time.monotonic() + relist
    while os.getppid() == parent:
        if time.monotonic() >= next_list:
            known = _grown(known)
            next_list = time.monotonic() + relist
        time.sleep(period)
    # The parent is gone. Whatever it knew of that still runs, and anything those started
    # since the last look (listed now, while they are still their parents' children).
    terminate(_grown(known), grace)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent, relist = int(argv[0]), float(argv[1])
    known = [Proc(*map(int, a.split(":"))) for a in argv[2:]]
    watch(parent, known, relist=relist)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
