"""The node's helper processes: hivemind's DHT process and the p2pd daemon it starts.

hivemind leaves both running when the main process dies by a signal, so the node stops
them itself: a polite DHT shutdown (which stops p2pd), then SIGTERM and SIGKILL for any
descendant that outlived it. The list of descendants is read from /proc *before* the
shutdown, because a p2pd whose parent died is re-parented and no longer looks like ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from hivemind import DHT

from .settings import NodeConfig


def start_dht(node: NodeConfig, identity_path: str) -> DHT:
    """A DHT process (and its p2pd) with our identity, listening where asked."""
    kwargs = {"identity_path": identity_path, "host_maddrs": node.maddrs("host_maddrs"),
              # hivemind's "is this identity taken" probe reads RSA keys only; our key is
              # Ed25519, and a clash surfaces anyway as the other peer's error.
              "check_if_identity_free": False}
    if node.announce_maddrs:
        kwargs["announce_maddrs"] = node.maddrs("announce_maddrs")
    return DHT(initial_peers=node.maddrs("initial_peers") or None, start=True,
               client_mode=node.client_mode, **kwargs)


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (Linux /proc; elsewhere: none found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_dht(dht: DHT, grace: float = 3.0) -> None:
    helpers = descendants(os.getpid())
    with contextlib.suppress(Exception):
        dht.shutdown()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in helpers if alive(p)]
        if not left:
            break
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap what was ours
            pass
