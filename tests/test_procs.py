"""The node's helper processes: signalled only while a pid still names the process we listed,
and stopped by the reaper when the node itself is killed with SIGKILL. Real processes, no
mocks: ``sleep`` stands in for a helper, and the last tests run hivemind's DHT and p2pd."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from byteswarm.node import procs
from byteswarm.node.reaper import Proc, alive, descendants, identify, signal_proc, terminate

FAST = ["--max-bytes", "2000000", "--batch-size", "8", "--val-batches", "2", "--threads", "1",
        "--heartbeat-period", "0.5", "--peer-ttl", "4", "--linger", "1", "--swarm", "t"]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _gone_within(procs_: list[Proc], seconds: float) -> list[Proc]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in procs_):
        time.sleep(0.05)
    return [p for p in procs_ if alive(p)]


def test_a_pid_with_another_start_time_is_another_process(sleeper):
    real = identify(sleeper.pid)
    assert real is not None and alive(real)
    recycled = Proc(sleeper.pid, real.start + 1)  # what a reused pid looks like
    assert not alive(recycled)
    assert signal_proc(recycled, signal.SIGKILL) is False
    assert terminate([recycled], grace=0.2) == []
    assert sleeper.poll() is None and alive(real)  # the stranger was left alone
    assert terminate([real], grace=5) == []
    assert sleeper.wait(5) == -signal.SIGTERM  # a polite signal was enough
    assert not alive(real) and signal_proc(real, signal.SIGKILL) is False


def test_descendants_finds_grandchildren_with_their_start_times():
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(found := descendants(os.getpid())) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        under = [p for p in found if p.pid == shell.pid or p in descendants(shell.pid)]
        assert len(under) == 3 and under[0].pid == shell.pid  # parents first
        assert all(identify(p.pid) == p for p in under)
    finally:
        terminate(descendants(shell.pid) + [identify(shell.pid)], grace=2)
        shell.wait(5)


class _NoDHT:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def shutdown(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass


def test_stop_dht_skips_a_pid_recycled_since_it_was_listed(sleeper, monkeypatch):
    real = identify(sleeper.pid)
    # stop_dht lists the DHT's tree, shuts the DHT down, then signals what is left: here
    # the listed process is gone and its pid now runs a stranger (our sleeper).
    monkeypatch.setattr(procs, "identify", lambda pid: Proc(real.pid, real.start - 1))
    procs.stop_dht(_NoDHT(real.pid), grace=0.2)
    assert sleeper.poll() is None and alive(real)
    monkeypatch.setattr(procs, "identify", lambda pid: real)
    procs.stop_dht(_NoDHT(real.pid), grace=5)
    assert not alive(real)


PARENT = """
import subprocess, sys, time
from byteswarm.node import reaper
from byteswarm.node.reaper import identify
bystander = subprocess.Popen(["sleep", "60"])  # the host's own child: not the reaper's
# A helper the reaper is told about at start, and under it one it finds by looking again.
helper = subprocess.Popen(["sh", "-c", "sleep 0.5; sleep 60 & wait"])
reaper.start([identify(helper.pid)], relist=0.3)
time.sleep(1.5)
print(bystander.pid, helper.pid, flush=True)
time.sleep(60)
"""


def test_the_reaper_stops_the_helpers_of_a_parent_killed_with_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        bystander, helper = map(int, parent.stdout.readline().split())
        everything = descendants(parent.pid)
        watchers = [p for p in everything if "reaper.py" in _cmdline(p.pid)]
        helpers = [identify(helper), *descendants(helper)]
        assert len(watchers) == 1 and len(helpers) == 2  # sh, and the sleep it started late
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        assert _gone_within(helpers + watchers, 8) == []  # the helpers, then the reaper
        assert alive(identify(bystander))  # what the reaper was not given is left alone
    finally:
        _kill_group(parent.pid)


@pytest.mark.slow
def test_a_dht_stopped_in_a_host_process_leaves_the_hosts_other_children_be(sleeper, tmp_path):
    """byteswarm.Optimizer runs the node inside a user's process (and pytest): stopping its
    DHT once killed torch's shared-memory manager there, and every hivemind future after
    that failed with "Broken pipe"."""
    from byteswarm.node.node_cli import ensure_identity
    from byteswarm.node.settings import NodeConfig
    mine = identify(sleeper.pid)
    key, _ = ensure_identity(str(tmp_path / "identity.key"))
    dht = procs.start_dht(NodeConfig(), str(key))
    procs.start_reaper(dht)
    tree = procs.dht_tree(dht)
    assert any(_comm(p.pid) == "p2pd" for p in tree) and mine not in tree
    procs.stop_dht(dht)
    assert _gone_within(tree, 8) == [] and not procs._reapers
    assert alive(mine) and sleeper.poll() is None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _p2pd_after_sigkill(argv: list[str], ready: str, tmp_path: Path) -> tuple[list, list]:
    """Start ``argv`` in its own session, wait for ``ready`` on its output, find its p2pd,
    SIGKILL it; returns (its helper processes, those still alive 8 s later)."""
    log = tmp_path / "out.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        helpers = descendants(proc.pid)
        p2pd = [p for p in helpers if _comm(p.pid) == "p2pd"]
        assert len(p2pd) == 1, [_cmdline(p.pid) for p in helpers]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return helpers, _gone_within(helpers, 8)
    finally:
        _kill_group(proc.pid)


DHT_OWNER = """
import sys, time
from byteswarm.node.node_cli import ensure_identity
from byteswarm.node.procs import start_dht, start_reaper
from byteswarm.node.settings import NodeConfig
key, _ = ensure_identity(sys.argv[1] + "/identity.key")
dht = start_dht(NodeConfig(), str(key))
start_reaper(dht)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_p2pd_dies_with_a_dht_owner_killed_with_sigkill(tmp_path):
    """What node_cli does (start_dht, then start_reaper) with real hivemind processes."""
    helpers, left = _p2pd_after_sigkill([sys.executable, "-c", DHT_OWNER, str(tmp_path)],
                                        "ready", tmp_path)
    assert left == [], [_cmdline(p.pid) for p in left]


@pytest.mark.slow
def test_p2pd_dies_with_a_node_killed_with_sigkill(tmp_path):
    argv = [sys.executable, "-m", "byteswarm.node.node_cli", "--out", str(tmp_path / "n"),
            *FAST]
    helpers, left = _p2pd_after_sigkill(argv, "listening on", tmp_path)
    assert left == [], [_cmdline(p.pid) for p in left]


def test_the_reaper_runs_on_the_standard_library_alone():
    """It is launched with -I -S: an import of byteswarm or hivemind there would fail."""
    source = textwrap.dedent(inspect.getsource(sys.modules["byteswarm.node.reaper"]))
    imports = {ln.split()[1].split(".")[0] for ln in source.splitlines()
               if ln.startswith(("import ", "from "))}
    assert imports <= {"__future__", "contextlib", "os", "signal", "subprocess", "sys",
                       "time", "pathlib", "typing"}, imports
