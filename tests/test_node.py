"""``byteswarm node`` as real OS processes on 127.0.0.1: hivemind's DHT, p2pd and streams,
nothing mocked. Each node runs in its own process group, which the fixture kills whatever
happens, so no p2pd or DHT process outlives a test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from byteswarm.optim.files import read_metrics

EXE = shutil.which("byteswarm") or str(Path(sys.executable).with_name("byteswarm"))
FAST = ["--max-bytes", "2000000", "--batch-size", "8", "--val-batches", "2", "--threads", "1",
        "--heartbeat-period", "0.5", "--peer-ttl", "4", "--linger", "1", "--swarm", "t"]


def group_pids(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (zombies excluded)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


# Child processes of the tests run SPSA's CPU kernels eagerly: they are bit-identical to
# the compiled ones (tests/test_rademacher.py), and each process skips about 14 s of
# torch.compile at start, which the tests' short runs never earn back.
CHILD_ENV = {**os.environ, "BYTESWARM_CPU_KERNELS": "reference"}


class Node:
    """``byteswarm node --out OUT FAST… ARGS…``, or ``byteswarm COMMAND… --out OUT ARGS…``."""

    def __init__(self, out: Path, args: list[str], command: list[str] | None = None):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"{out.name}.log"
        self.log = self.log_path.open("ab")
        argv = (["node", "--out", str(out), *FAST, *args] if command is None
                else [*command, "--out", str(out), *args])
        self.proc = subprocess.Popen([EXE, *argv], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=CHILD_ENV)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) before {what}:\n"
                                     + self.text()[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")

    def maddr(self, timeout: float = 60) -> str:
        line = self.wait_for(lambda: next((ln for ln in self.text().splitlines()
                                           if "listening on" in ln), None),
                             timeout, "the listening line")
        return line.split("listening on ")[1].strip()

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        try:
            return read_metrics(path) if path.exists() else []
        except json.JSONDecodeError:  # a line being written right now
            return []

    def step(self) -> int:
        rows = self.rows()
        return rows[-1]["step"] if rows else 0

    def wait_step(self, n: int, timeout: float) -> None:
        self.wait_for(lambda: self.step() >= n, timeout, f"step {n}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node did not exit:\n{self.text()[-3000:]}") from None

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def launch(tmp_path):
    nodes: list[Node] = []

    def start(name: str, *args: str, command: list[str] | None = None) -> Node:
        node = Node(tmp_path / name, list(args), command)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill_group()
    for node in nodes:  # shown with a failing test's report: what every node said
        if node.log_path.exists():
            print(f"--- {node.out.name}\n{node.text()[-2500:]}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(group_pids(n.pid) for n in nodes):
        time.sleep(0.1)
    assert not [p for n in nodes for p in group_pids(n.pid)], "processes outlived the test"


def spsa_config(tmp_path: Path, **spsa) -> str:
    """A config file with these [spsa] values. Tests that compare the fingerprints rows
    log when a step closes pass deadline='"fixed"' where late records must stay rare: a
    record later than a learned wait is applied late, and its step's row shows θ before
    it (the replicas agree again once it is in)."""
    path = tmp_path / "spsa.toml"
    path.write_text("[spsa]\n" + "".join(f"{k} = {v}\n" for k, v in spsa.items()))
    return str(path)


def outer_config(tmp_path: Path, algo: str, min_peers: int, round_timeout: float) -> str:
    """A NoLoCo or DiLoCo config for quick rounds: H = 5, warmup 5."""
    path = tmp_path / f"{algo}.toml"
    path.write_text(f"[node]\nalgo = '{algo}'\nmin_peers = {min_peers}\n[{algo}]\n"
                    f"inner_steps = 5\nwarmup = 5\nround_timeout = {round_timeout}\n")
    return str(path)


def by_step(node: Node) -> dict[int, dict]:
    return {r["step"]: r for r in node.rows()}


@pytest.mark.slow
def test_three_spsa_nodes_stay_identical_and_learn(launch, tmp_path):
    cfg = spsa_config(tmp_path, step_timeout=3.0)
    common = ["--config", cfg, "--min-peers", "3", "--steps", "40", "--eval-every", "10"]
    a = launch("a", *common, "--shard", "0")
    maddr = a.maddr()
    b = launch("b", *common, "--shard", "1", "--initial-peers", maddr)
    c = launch("c", *common, "--shard", "2", "--initial-peers", maddr)
    for n in (a, b, c):
        assert n.wait(timeout=150) == 0, n.text()[-3000:]
        assert group_pids(n.pid) == [], "DHT process or p2pd left after a clean exit"
    rows = [by_step(n) for n in (a, b, c)]
    for r in rows:
        assert sorted(r) == list(range(1, 41))
    for step in range(1, 41):  # bit-identical replicas at every step
        assert len({r[step]["fingerprint"] for r in rows}) == 1, step
    val = [rows[0][s]["val_loss"] for s in (10, 20, 30, 40)]
    assert all(r[s]["val_loss"] == rows[0][s]["val_loss"] for r in rows for s in (10, 40))
    assert val[-1] < val[0] - 0.3 and val[-1] < 5.0, val  # uniform guessing: ln 256 = 5.55
    for n in (a, b, c):
        s = n.summary()
        assert s["stopped"] == "done" and s["steps"] == 40 and s["peers"] == 3
        assert s["stats"]["records_applied"] == 120  # every record of every peer, once
        # One record a step to each of two peers: a ~70-byte frame, no more.
        assert 40 * 2 * 40 <= s["sent_by_type"]["Record"] <= 40 * 2 * 120
        assert s["received_by_type"]["Record"] >= 40 * 2 * 40
        assert s["rejects"] == {}
        assert s["fingerprint"] == rows[0][40]["fingerprint"]


@pytest.mark.slow
def test_sigterm_checkpoints_tears_down_and_resumes_exactly(launch, tmp_path):
    args = ["--steps", "100000", "--checkpoint-every", "100000", "--eval-every", "1000",
            "--identity", str(tmp_path / "key")]
    a = launch("a", *args)
    a.wait_step(30, timeout=90)
    helpers = [p for p in group_pids(a.pid) if p != a.pid]
    assert len(helpers) >= 2  # hivemind's DHT process and p2pd, at least
    a.proc.send_signal(signal.SIGTERM)  # the node alone, not its group
    assert a.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_pids(a.pid):
        time.sleep(0.1)
    assert group_pids(a.pid) == [], "SIGTERM left helpers running"
    assert a.summary()["stopped"] == "signal"
    stopped = a.step()
    assert (a.out / "checkpoint.pt").exists()

    # Same --out: resume from the checkpoint; the metrics go on without a gap or repeat.
    # Beside it, an uninterrupted run with the same identity (alone in its own swarm).
    target = str(stopped + 10)
    again = launch("a", "--steps", target, "--eval-every", "1000",
                   "--identity", str(tmp_path / "key"))
    straight = launch("straight", "--steps", target, "--eval-every", "1000",
                      "--identity", str(tmp_path / "key"))
    for n in (again, straight):
        assert n.wait(timeout=90) == 0, n.text()[-3000:]
    assert f"resumed from {a.out / 'checkpoint.pt'} at step {stopped}" in again.text()
    steps = [r["step"] for r in again.rows()]
    assert steps == list(range(1, stopped + 11))
    # Exactly the state the uninterrupted run reaches.
    assert straight.summary()["fingerprint"] == again.summary()["fingerprint"]


@pytest.mark.slow
def test_four_noloco_nodes_average_with_partners(launch, tmp_path):
    cfg = outer_config(tmp_path, "noloco", 4, 15.0)
    common = ["--config", cfg, "--steps", "20", "--eval-every", "5"]
    a = launch("a", *common, "--shard", "0")
    maddr = a.maddr()
    others = [launch(n, *common, "--shard", str(k), "--initial-peers", maddr)
              for k, n in enumerate("bcd", start=1)]
    for n in (a, *others):
        assert n.wait(timeout=150) == 0, n.text()[-3000:]
    for n in (a, *others):
        s = n.summary()
        assert s["stats"]["rounds_completed"] == 4
        assert s["stats"]["rounds_with_partner"] >= 3, s["stats"]
        # φ and θ − φ of 136k fp32 each, to one partner a round: about 1.1 MB a round.
        assert s["sent_by_type"]["NoLoCoShare"] >= 3 * 2 * 4 * 136_000
        rows = by_step(n)
        assert rows[20]["val_loss"] < rows[5]["val_loss"] - 0.3
        assert rows[20]["algo"]["rounds_with_partner"] == s["stats"]["rounds_with_partner"]


@pytest.mark.slow
def test_three_diloco_nodes_one_in_client_mode_share_the_outer_weights(launch, tmp_path):
    cfg = outer_config(tmp_path, "diloco", 3, 15.0)
    common = ["--config", cfg, "--steps", "20", "--eval-every", "5"]
    a = launch("a", *common, "--shard", "0")
    maddr = a.maddr()
    b = launch("b", *common, "--shard", "1", "--initial-peers", maddr)
    # Not dialed by anyone: it hears back over the streams it opens itself.
    c = launch("c", *common, "--shard", "2", "--initial-peers", maddr, "--client-mode")
    for n in (a, b, c):
        assert n.wait(timeout=150) == 0, n.text()[-3000:]
    summaries = [n.summary() for n in (a, b, c)]
    for s in summaries:
        assert s["stats"]["rounds_with_partner"] == 4 and s["stats"]["parts_missing"] == 0
        assert "state" not in s["received_by_type"]  # a fresh swarm: nobody downloads
        assert s["transport_events"].get("unreachable", 0) == 0
    # Every part of every round arrived everywhere, so the outer weights are one.
    assert len({s["final_val_loss"] for s in summaries}) == 1
    assert summaries[2]["sent_by_type"]["ReducePart"] > 0
    assert summaries[2]["received_by_type"]["GatherPart"] > 0
