"""Learned deadlines on real nodes: a member that announces itself and never sends a
record costs an SPSA swarm at most ``dormant_after`` step timeouts in all, not one per step.
Real processes, real hivemind; the silent member heartbeats through its own DHT peer."""

from __future__ import annotations

import asyncio
import signal

import pytest
from byteswarm.node.identity import create_identity
from test_hostile import as_member
from test_node import by_step, launch, spsa_config  # noqa: F401  (launch is a fixture)


@pytest.mark.slow
def test_a_silent_member_costs_a_few_step_timeouts_in_all(launch, tmp_path):  # noqa: F811
    cfg = spsa_config(tmp_path, step_timeout=2.0, dormant_after=3, deadline='"learned"')
    common = ["--config", cfg, "--min-peers", "2", "--steps", "100000", "--eval-every", "1000"]
    a = launch("a", *common)
    maddr = a.maddr()
    b = launch("b", *common, "--initial-peers", maddr)
    a.wait_step(5, timeout=120)  # the pair trains before the silent member shows up
    key = tmp_path / "silent.key"
    create_identity(key)
    before = a.step()
    # 20 s listed as a member, sending nothing: with fixed waits, 10 steps at most.
    asyncio.run(as_member(maddr, "t", 20.0, lambda *_: (), str(key)))
    during = a.step() - before
    for n in (a, b):
        n.proc.send_signal(signal.SIGTERM)
    for n in (a, b):
        assert n.wait(timeout=30) == 128 + signal.SIGTERM
    for n in (a, b):
        stats = n.summary()["stats"]
        # Three whole timeouts for the silent member; any other timeout is the honest
        # peer's record coming later than its learned wait (a few tenths of a second).
        assert stats["seconds_timed_out"] < 3 * 2.0 + 1.5, stats
        assert stats["deadlines"]["went_dormant"] == 1, stats
        assert stats["deadlines"]["wait_max"] < 1.0, stats
    assert during > 40, during  # fixed waits: at most 10 steps in those 20 s
    rows = [by_step(n) for n in (a, b)]
    shared = sorted(set(rows[0]) & set(rows[1]))
    assert shared and all(rows[0][s]["fingerprint"] == rows[1][s]["fingerprint"]
                          for s in shared[-20:])
