"""The simulator's network model against hand-computed transfer times."""

import pytest
from byteswarm.sim.network import Link, Network

MB = 1_000_000


def net(**links):
    n = Network(seed=1)
    for name, link in links.items():
        n.add_peer(name, link)
    return n


def run_all(n):
    out = []
    while (t := n.next_event_time()) < float("inf"):
        out += n.advance(t)
    return out


def test_one_transfer_takes_latency_plus_size_over_rate():
    n = net(a=Link(up=2 * MB, down=100 * MB, latency=0.01),
            b=Link(up=100 * MB, down=1 * MB, latency=0.02))
    n.send("a", "b", 4 * MB, "x", now=1.0)
    (d,) = run_all(n)
    # Bottleneck is b's downlink (1 MB/s): 4 s, plus 0.03 s of one-way latency.
    assert d.at == pytest.approx(1.0 + 4.0 + 0.03)
    assert d.payload == "x" and n.bytes_sent["a"] == 4 * MB == n.bytes_received["b"]


def test_two_concurrent_uploads_share_the_uplink():
    n = net(a=Link(up=1 * MB, down=100 * MB), b=Link(up=100 * MB, down=100 * MB),
            c=Link(up=100 * MB, down=100 * MB))
    n.send("a", "b", 1 * MB, "to b", now=0.0)
    n.send("a", "c", 1 * MB, "to c", now=0.0)
    ds = run_all(n)
    assert [d.at for d in ds] == pytest.approx([2.0, 2.0])  # each got half of the uplink


def test_a_late_flow_slows_an_earlier_one_and_speeds_up_when_it_ends():
    n = net(a=Link(up=1 * MB, down=100 * MB), b=Link(up=100 * MB, down=100 * MB),
            c=Link(up=100 * MB, down=100 * MB))
    n.send("a", "b", 2 * MB, "long", now=0.0)
    n.advance(1.0)
    n.send("a", "c", int(0.5 * MB), "short", now=1.0)
    ds = {d.payload: d.at for d in run_all(n)}
    # 0..1 s: long alone (1 MB done). 1..2 s: both at 0.5 MB/s (short done, long at 1.5 MB).
    # 2..2.5 s: long alone finishes its last 0.5 MB.
    assert ds["short"] == pytest.approx(2.0) and ds["long"] == pytest.approx(2.5)


def test_downlink_is_shared_too():
    n = net(a=Link(up=10 * MB, down=10 * MB), b=Link(up=10 * MB, down=10 * MB),
            c=Link(up=10 * MB, down=2 * MB))
    n.send("a", "c", 1 * MB, 1, now=0.0)
    n.send("b", "c", 1 * MB, 2, now=0.0)
    assert [d.at for d in run_all(n)] == pytest.approx([1.0, 1.0])


def test_a_lost_message_costs_a_retransmission():
    n = net(a=Link(up=1 * MB, down=1 * MB, loss=0.5), b=Link(up=1 * MB, down=1 * MB))
    n.rto = 0.25
    ds = []
    for i in range(200):
        ds += n.advance(float(i))  # the driver always advances to now before sending
        n.send("a", "b", 1000, i, now=float(i))
    ds += run_all(n)
    retried = [d for d in ds if d.attempts > 1]
    assert 60 < len(retried) < 140  # about half the messages lost once or more
    for d in ds:
        # Each failed attempt costs the transfer time plus the retransmission timeout.
        expected = d.payload + d.attempts * 0.001 + (d.attempts - 1) * 0.25
        assert d.at == pytest.approx(expected)


def test_region_latency_and_leaving_peers():
    n = Network(region_latency={("eu", "us"): 0.05}, seed=0)
    n.add_peer("a", Link(up=MB, down=MB, latency=0.01), "eu")
    n.add_peer("b", Link(up=MB, down=MB, latency=0.02), "us")
    assert n.one_way_latency("a", "b") == pytest.approx(0.08)
    n.send("a", "b", MB, "lost with its peer", now=0.0)
    n.remove_peer("b", now=0.5)
    assert run_all(n) == []
    n.send("a", "b", 10, "to nobody", now=1.0)  # sending to a departed peer is a no-op
    assert run_all(n) == []


def test_a_peer_leaving_while_its_message_waits_for_a_retry():
    n = net(a=Link(up=1e6, down=1e6, loss=0.5), b=Link(up=1e6, down=1e6))
    n.rto = 10.0
    for i in range(20):
        n.send("a", "b", 1000, i, now=0.0)
    n.advance(1.0)  # some attempts failed and wait 10 s for their retry
    n.remove_peer("b", now=1.0)
    assert run_all(n) == []  # the retries are dropped with their peer, no crash
