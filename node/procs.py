"""The node's helper processes: hivemind's DHT process and the p2pd daemon it starts.

hivemind leaves both running when the main process dies by a signal, so the node stops
them itself: a polite DHT shutdown (which stops p2pd), then SIGTERM and SIGKILL for any
process of the DHT's tree that outlived it. The tree is read from /proc *before* the
shutdown, because a p2pd whose parent died is re-parented and no longer looks like ours;
each is listed with its start time, so a pid that was recycled in the meantime is not
signalled (node/reaper.py).

A node killed with SIGKILL runs none of that, so ``start_reaper`` (called once the DHT is
up) launches a small watcher process that does it instead when the node is gone. Both act
on the DHT's own process tree only, never on the host process's other children.
"""

from __future__ import annotations

import contextlib
import subprocess

from hivemind import DHT

from .dhtrecords import SwarmRecords
from .reaper import Proc, alive, descendants, identify, terminate
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


_reapers: dict[int, subprocess.Popen] = {}  # DHT pid -> the reaper that guards its tree


def dht_tree(dht: DHT) -> list[Proc]:
    """The DHT process and everything under it (p2pd), parents first: the only processes
    the node stops. Nothing else of the host process's is touched: a node embedded in a
    user's program (byteswarm.Optimizer), or in pytest, leaves their other children be
    (torch's shared-memory manager among them, which hivemind's futures need)."""
    pid = getattr(dht, "pid", None)
    root = identify(pid) if pid else None
    return [root, *descendants(pid)] if root is not None else []


def start_reaper(dht: DHT) -> None:
    """Make sure ``dht``'s process and its p2pd die with us, even by SIGKILL: launch a
    reaper process (once per DHT) that stops that tree when this process is gone. Call it
    right after start_dht, so both are known to the reaper from its first moment."""
    old = _reapers.get(dht.pid)
    if old is None or old.poll() is not None:
        _reapers[dht.pid] = launch_reaper(dht_tree(dht))


def stop_dht(dht: DHT, grace: float = 3.0) -> None:
    """Shut the DHT down politely, then stop any of its tree that outlived it; the reaper
    last, so that a kill during this still leaves it to finish the job."""
    helpers = dht_tree(dht)
    with contextlib.suppress(Exception):
        dht.shutdown()
    terminate([p for p in helpers if alive(p)], grace)
    _stop_reaper(_reapers.pop(getattr(dht, "pid", None), None), grace)
    with contextlib.suppress(Exception):
        dht.join(grace)  # reap the DHT process (ours); p2pd was its child, not ours


def _stop_reaper(reaper: subprocess.Popen | None, grace: float) -> None:
    if reaper is None:
        return
    with contextlib.suppress(ProcessLookupError):
        reaper.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(grace)
