"""Learned deadlines: each sender is waited for about as long as it has needed, and a silent
member stops being waited for after a few misses, without changing a single bit of θ."""

import pytest
from byteswarm.optim.data import Corpus, DataConfig
from byteswarm.optim.deadlines import MARGIN, POOLED_MARGIN, Deadlines
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.sansio import EVERYONE
from byteswarm.optim.spsa import Record, SPSAConfig
from byteswarm.optim.workload import ALGOS, Workload


def test_a_wait_follows_the_delays_seen_and_stays_within_its_bounds():
    d = Deadlines(5.0, floor=0.05)
    assert d.wait_for("a") == 5.0  # nothing seen yet: the whole timeout
    for delay in (0.2, 0.1, 0.3, -1.0):  # (an early message has delay 0)
        d.heard("a", delay)
    assert d.wait_for("a") == pytest.approx(MARGIN * 0.3 + 0.05)
    for _ in range(20):
        d.heard("slow", 9.0)
        d.heard("quick", 0.0)
    assert d.wait_for("slow") == 5.0 and d.wait_for("quick") == 0.05  # the bounds
    pooled = Deadlines(5.0, floor=0.05)
    for sender in ("a", "b", "c"):
        pooled.heard(sender, 0.1)
    # Seen too rarely (or never): as long as everyone's recent messages took, wider margin.
    assert pooled.wait_for("rare") == pytest.approx(POOLED_MARGIN * 0.1 + 0.05)
    assert d.wait({"a", "quick"}) == d.wait_for("a")  # the slowest of those still awaited
    assert Deadlines(5.0, mode="fixed").wait_for("quick") == 5.0
    with pytest.raises(ValueError, match="deadline mode"):
        Deadlines(1.0, mode="guess")


def test_a_sender_missing_k_deadlines_in_a_row_is_dormant_until_it_speaks():
    d = Deadlines(2.0, dormant_after=3)
    for _ in range(2):
        d.missed({"ghost"})
    d.heard("ghost", None)  # a message resets the count
    for _ in range(2):
        d.missed({"ghost"})
    assert not d.dormant and d.wait({"ghost"}) == 2.0
    d.missed({"ghost"})
    assert d.dormant == {"ghost"} and d.wait({"ghost"}) == 0.0
    d.heard("ghost", 0.1)
    assert not d.dormant and d.counts["woke"] == 1
    for _ in range(3):
        d.missed({"ghost"})
    d.welcome("ghost")  # it left the membership and came back: waited for again
    assert not d.dormant and d.wait({"ghost"}) == d.wait_for("ghost") > 0
    fixed = Deadlines(2.0, mode="fixed", dormant_after=1)
    fixed.missed({"ghost"})
    assert not fixed.dormant  # the fixed mode waits for everyone, always


@pytest.fixture(scope="module")
def task():
    corpus = Corpus.load(DataConfig(max_bytes=1_000_000))
    return Workload(ModelConfig(preset="tiny"), DataConfig(batch_size=4), corpus, 0, 32,
                    corpus.val_set(4, 32, 1, seed=0))


def _swarm(task, mode: str):
    """Two real SPSA peers in a membership of three: p02 is listed but never sends."""
    ids = ["p00", "p01", "p02"]
    cfg = SPSAConfig(step_timeout=2.0, deadline=mode, dormant_after=3)
    return [ALGOS["spsa"].make(cfg, pid, k, 3, ids, task) for k, pid in enumerate(ids[:2])]


def _step_all(peers, now: float) -> float:
    """Both step at ``now``, hear each other 10 ms later, and wait out any deadline;
    returns when the step closed."""
    sent = []
    for p in peers:
        p.on_local_step(now)
        sent += [s.msg for s in p.outbox() if s.to == EVERYONE]
    now += 0.01
    for p in peers:
        for m in sent:
            if m.peer != p.peer_id:
                p.on_message(m.peer, m, now)
    for p in peers:
        if not p.can_step():
            now = max(now, p.next_deadline())
            p.on_timer(now)
        assert p.can_step()
    return now


def test_a_silent_member_costs_k_timeouts_in_all_and_replicas_stay_identical(task):
    learned, fixed = _swarm(task, "learned"), _swarm(task, "fixed")
    ends = {}
    for name, peers in (("learned", learned), ("fixed", fixed)):
        now = 0.0
        for _ in range(8):
            now = _step_all(peers, now)
        ends[name] = now
        assert peers[0].fingerprint() == peers[1].fingerprint()
    assert [p.counts["steps_timed_out"] for p in learned] == [3, 3]
    assert learned[0].waits.dormant == {"p02"}
    assert [p.counts["steps_timed_out"] for p in fixed] == [8, 8]
    assert ends["learned"] == pytest.approx(3 * 2.0 + 5 * 0.01)  # then no waits at all
    # Dormancy only decided when steps closed locally: the bits are those of fixed waits.
    assert learned[0].fingerprint() == fixed[0].fingerprint()
    # The silent member speaks (a record for the step after next): it is waited for again.
    t = learned[0].step
    for p in learned:
        p.on_message("p02", Record(t + 1, "p02", 3), ends["learned"])
    assert not learned[0].waits.dormant
    # Step t: it is waited for again (it sent nothing for t), as long as the swarm's
    # records took (it is seen too rarely for a wait of its own): far below the timeout.
    pooled = learned[0].waits.wait_for("p02")
    assert pooled == pytest.approx(POOLED_MARGIN * 0.01 + SPSAConfig().deadline_floor)
    now = _step_all(learned, ends["learned"])
    assert now == pytest.approx(ends["learned"] + pooled)
    assert learned[0].counts["steps_timed_out"] == 4
    assert _step_all(learned, now) == pytest.approx(now + 0.01)  # t + 1: its record is in
    assert learned[0].counts["steps_timed_out"] == 4
    assert learned[0].fingerprint() == learned[1].fingerprint()


def test_spot_checking_spsa_peers_keep_fixed_waits(task):
    """A record computed on a θ that lacks a late record fails a spot check, so a peer
    that ended steps early would be banned by honest peers: with checks on, no learning."""
    ids = ["p00", "p01"]
    cfg = SPSAConfig(step_timeout=2.0, spot_check_rate=0.5, deadline="learned")
    a, b = (ALGOS["spsa"].make(cfg, pid, k, 2, ids, task, index_of=ids.index)
            for k, pid in enumerate(ids))
    now = 0.0
    for _ in range(8):  # steps are checked when final (finality_steps 4 after they close)
        now = _step_all([a, b], now)
    assert a.waits.mode == "fixed" and a.waits.wait({"p01"}) == 2.0
    assert a.counts["spot_checks"] > 0 and not a.banned


def test_a_member_lagging_near_finality_gets_the_whole_timeout(task):
    """Ending steps early for a member whose records are finality_steps - 1 steps old
    would leave it behind until its records came too late for a final step."""
    ids = ["p00", "p01", "p02"]
    cfg = SPSAConfig(step_timeout=2.0, dormant_after=10, deadline="learned")  # finality 4
    peers = [ALGOS["spsa"].make(cfg, pid, k, 3, ids, task) for k, pid in enumerate(ids[:2])]
    for p in peers:
        p.on_message("p02", Record(0, "p02", 1), 0.0)  # p02 sends step 0, then nothing
    now = 0.0
    for t in range(4):
        waited = _step_all(peers, now) - now
        assert waited < 1.0 if t in (0, 2, 3) else waited == pytest.approx(2.0), t
        now += waited  # step 1: too little seen for a pooled wait yet
    a = peers[0]
    a.on_local_step(now)  # step 4: p02's latest record (step 0) is 3 steps old
    assert a.next_deadline() == pytest.approx(now + 2.0)


def test_a_dormant_member_that_rejoins_is_waited_for_again(task):
    peers = _swarm(task, "learned")
    now = 0.0
    for _ in range(4):
        now = _step_all(peers, now)
    a = peers[0]
    assert a.waits.dormant == {"p02"}
    a.on_peers(frozenset({"p00", "p01"}), now)  # p02's heartbeat expired
    a.on_peers(frozenset({"p00", "p01", "p02"}), now)  # and it is back (syncing, say)
    a.on_local_step(now)
    assert a.next_deadline() == pytest.approx(now + 2.0)
