"""Real node processes for scripts/bench_node.py: start one in its own process group, read
its metrics, and measure what its p2pd put on TCP and the CPU its group used (Linux /proc
and ``ss``), write its config file and read its step rate. No byteswarm logic here, only
process plumbing."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXE = shutil.which("byteswarm") or str(Path(sys.executable).with_name("byteswarm"))
SWARM = "sim"  # the simulator's swarm name for NoLoCo/DiLoCo: same envelope bytes
# Node flags shared by every run (tests/test_node.py's, with a longer peer TTL: eight
# nodes and their DHT processes on two cores can miss a 4 s TTL while they start).
COMMON = ["--max-bytes", "2000000", "--val-batches", "2", "--threads", "1",
          "--heartbeat-period", "0.5", "--peer-ttl", "10", "--linger", "1",
          "--checkpoint-every", "100000", "--swarm", SWARM]


def config_toml(algo: str, cfg: Any) -> str:
    """A node config file for ``cfg``: [node] algo and the fields that differ from the
    defaults (SPSA's swarm is the node's own, so it is left to --swarm)."""
    default = type(cfg)()
    lines = [f"[node]\nalgo = {json.dumps(algo)}\n[{algo}]\n"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != "swarm" and value != getattr(default, f.name):
            lines.append(f"{f.name} = {json.dumps(value)}\n")
    return "".join(lines)


def steps_per_second(rows: list[dict[str, Any]], skip: int = 10) -> float:
    """A node's training rate from its metrics rows: steps over seconds between row
    ``skip`` and the one before the last (the last pays the final evaluation)."""
    by_step = {r["step"]: r["seconds"] for r in rows}
    last = max(by_step) - 1
    if skip not in by_step or last not in by_step or last <= skip:
        raise ValueError(f"need metrics rows for steps {skip} and {last}")
    return (last - skip) / (by_step[last] - by_step[skip])


class Node:
    """One ``byteswarm node`` process in its own process group; output to OUT.log."""

    def __init__(self, out: Path, args: list[str]):
        """``byteswarm node --out OUT ARGS…`` (ARGS: everything else, common flags too)."""
        self.out = out
        shutil.rmtree(out, ignore_errors=True)  # a kept folder's old run must not resume
        out.mkdir(parents=True)
        self.log_path = out.parent / f"{out.name}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([EXE, "node", "--out", str(out), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line of the node's output that contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"no {text.strip()!r} line from {self.out}:\n"
                           f"{self.text()[-2000:]}")

    def maddr(self, timeout: float) -> str:
        return self.wait_for("listening on ", timeout).split("listening on ")[1].strip()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in (self.out / "metrics.jsonl").read_text().splitlines()
                if ln.strip()]

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the DHT process and p2pd too
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


# --- below the application layer: what p2pd put on TCP ----------------------------------

def group_stats(pgid: int) -> list[tuple[int, str, list[str]]]:
    """(pid, command name, the /proc stat fields after it) of each live process of a
    process group: the node, its DHT process and p2pd."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = rest.split()
        if int(fields[2]) == pgid:
            out.append((int(stat.parent.name), name, fields))
    return out


def group_pids(pgid: int, comm: str) -> list[int]:
    return [pid for pid, name, _ in group_stats(pgid) if name == comm]


def tcp_acked(pids: list[int]) -> dict[str, int] | None:
    """Bytes acknowledged so far on each TCP connection the processes ``pids`` own, by
    connection (``ss -tinp``); None if ``ss`` cannot tell."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    conns: dict[str, int] = {}
    head = None
    for line in out.splitlines():
        if not line[:1].isspace():  # a socket; its details follow on an indented line
            head = line
            continue
        acked = re.search(r"bytes_acked:(\d+)", line)
        if head and acked and {int(p) for p in re.findall(r"pid=(\d+)", head)} & set(pids):
            conns[" ".join(head.split()[3:5])] = int(acked.group(1))
        head = None
    return conns if out else None


def last_step(path: Path) -> int:
    """The step of the last complete metrics row (0 if none yet)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().split(b"\n")
        return json.loads(lines[-2])["step"] if len(lines) > 1 else 0
    except (OSError, ValueError, KeyError):
        return 0


class WireWindow:
    """TCP bytes a node's p2pd sent from its step ``first`` to its last step ``last``:
    sampled when the metrics row of ``first`` appears and 0.3 s after that of ``last``
    (the node lingers 1 s, so its last frames have left by then). Everything p2pd sends
    counts: our frames, the DHT's heartbeat RPCs, libp2p's noise and yamux framing."""

    def __init__(self, node: Node, first: int, last: int):
        self.node, self.first, self.last = node, first, last
        self.start: tuple[int, dict[str, int]] | None = None  # (step, bytes by connection)
        self.seen_last: float | None = None
        self.tcp: int | None = None  # bytes sent in the window
        self.steps = 0
        self.t_start = self.seconds = 0.0

    def _sample(self) -> dict[str, int] | None:
        return tcp_acked(group_pids(self.node.proc.pid, "p2pd"))

    def poll(self) -> None:
        if self.tcp is not None or self.node.proc.poll() is not None:
            return
        step = last_step(self.node.out / "metrics.jsonl")
        if self.start is None:
            if step >= self.first:
                conns = self._sample()
                self.start = (step, conns) if conns is not None else (step, {})
                self.t_start = time.monotonic()
            return
        if step >= self.last and self.seen_last is None:
            self.seen_last = time.monotonic()
        if self.seen_last is not None and time.monotonic() - self.seen_last >= 0.3:
            end = self._sample()
            if end and self.start[1]:
                self.tcp = sum(v - self.start[1].get(c, 0) for c, v in end.items())
                self.steps = step - self.start[0]
                self.seconds = time.monotonic() - self.t_start

    def app_bytes(self) -> int:
        """The node's own count over the same steps: final total minus the row's at the
        window's start."""
        row = next(r for r in self.node.rows() if r["step"] == self.start[0])
        return self.node.summary()["bytes_sent"] - row["bytes_sent"]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of a process group's live processes, all threads."""
    ticks = sum(int(f[11]) + int(f[12]) for _, _, f in group_stats(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")
