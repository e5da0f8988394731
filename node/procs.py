"""The node's helper processes: hivemind's DHT process and the p2pd daemon it starts.

hivemind leaves both running when the main process dies by a signal, so the node stops
them itself: a polite DHT shutdown (which stops p2pd), then SIGTERM and SIGKILL for any
descendant that outlived it. The list of descendants is read from /proc *before* the
shutdown, because a p2pd whose parent died is re-parented and no longer looks like ours;
each is listed with its start time, so a pid that was recycled in the meantime is not
signalled (node/reaper.py).

A node killed with SIGKILL runs none of that, so ``start_reaper`` (called once the DHT is
up) launches a small watcher process that does it instead when the node is gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

from hivemind import DHT

from .dhtrecords import SwarmRecords
from .reaper import Proc, alive, descendants, terminate
from .reaper import start as launch_reaper
from .settings import NodeConfig


def start_dht(node: NodeConfig, identity_path: str) -> DHT:
    """A DHT process (and its p2pd) with our identity, listening where asked, that stores
    and believes only records valid under our swarm's rules (node/dhtrecords.py)."""
    kwargs = {"identity_path": identity_path, "host_maddrs": node.maddrs("host_maddrs"),
              "record_validators": [SwarmRecords(node.swarm)],
              # hivemind's "is this identity taken" probe reads RSA keys only; our key is
              # Ed25519, and a clash surfaces anyway as the other peer's error.
              "check_if_identity_free": False}
    if node.announce_maddrs:
        kwargs["announce_maddrs"] = node.maddrs("announce_maddrs")
    return DHT(initial_peers=node.maddrs("initial_peers") or None, start=True,
               client_mode=node.client_mode, **kwargs)


_reaper: subprocess.Popen | None = None  # this process's reaper, once started


def start_reaper() -> None:
    """Make sure our helpers die with us, even by SIGKILL: launch a reaper process (once)
    that stops them when this process is gone. Call it after start_dht, so the DHT
    process and its p2pd are known to the reaper from its first moment."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        _reaper = launch_reaper()


def stop_dht(dht: DHT, grace: float = 3.0) -> None:
    """Shut the DHT down politely, then stop any helper that outlived it; the reaper last,
    so that a kill during this still leaves it to finish the job."""
    watcher = _reaper.pid if _reaper is not None else None
    helpers: list[Proc] = [p for p in descendants(os.getpid()) if p.pid != watcher]
    with contextlib.suppress(Exception):
        dht.shutdown()
    terminate([p for p in helpers if alive(p)], grace)
    _stop_reaper(grace)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap what was ours
            pass


def _stop_reaper(grace: float) -> None:
    global _reaper
    if _reaper is None:
        return
    with contextlib.suppress(ProcessLookupError):
        _reaper.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        _reaper.wait(grace)
    _reaper = None
