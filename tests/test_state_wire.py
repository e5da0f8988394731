"""State on the wire (protocols/state.py) and the state contract behind it (optim/sansio.py).

Every format round-trips and is deterministic (equal states, equal bytes: donors of one
state serve one index). Every decoder refuses, as ``Rejected("bad_state")`` (requests:
``"bad_request"``), truncation, trailing bytes, a wrong version or kind, wrong sizes,
non-finite vectors and out-of-range ints, and refuses allocation bombs while allocating
almost nothing. The algorithms' ``import_state`` refuses a state of the wrong type or size
and changes nothing; ``state_dict``/``load_state_dict`` resume exactly.
"""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
import torch
from byteswarm.node import algos as A
from byteswarm.optim.data import DataConfig
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.files import load_checkpoint, save_checkpoint
from byteswarm.optim.inner import OuterState
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import MAX_OPEN_STEPS, Q_MAX, RecordLog, Snapshot, SPSAConfig, SPSAState
from byteswarm.optim.workload import load_workload
from byteswarm.protocols import state as P

N = 64  # the receiver's parameter count
PEERS = ("12D3KooWaaa", "12D3KooWbbb", "p007")


def vec(seed: int, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


SNAP = Snapshot(40, vec(0), 0.25, {41: 1.5, 43: 2.0, 42: 0.5}, {"p007": 45, "12D3KooWccc": 9},
                {"12D3KooWaaa": (30, 12)})
LOG = RecordLog(43, {41: {"p007": -3, "12D3KooWaaa": 127}, 43: {"12D3KooWbbb": -127},
                     42: {}})
OUTER = OuterState(3, vec(1), vec(2))
ENVELOPES = [b"\x01" * 100, b"\x02" * 1000, b""]


def reason(fn, *args) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args)
    return e.value.reason


def edit(blob: bytes, *path_and_value) -> bytes:
    """``blob`` (one of ours: trusted) unpacked, the item at ``path`` set, packed again."""
    *path, value = path_and_value
    obj = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    node = obj
    for i in path[:-1]:
        node = node[i]
    if value is DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return msgpack.packb(obj, use_bin_type=True)


DROP = object()


# --- round trips and determinism ----------------------------------------------------------------

def same_snapshot(a: Snapshot, b: Snapshot) -> bool:
    return ((a.step, a.g2, a.scales, a.bans) == (b.step, b.g2, b.scales, b.bans)
            and {p: sorted(t) for p, t in a.strikes.items()}
            == {p: sorted(t) for p, t in b.strikes.items()}
            and torch.equal(a.theta, b.theta) and b.theta.dtype == torch.float32)


def same_outer(a: OuterState, b: OuterState) -> bool:
    return (a.round == b.round and torch.equal(a.phi, b.phi)
            and torch.equal(a.momentum, b.momentum))


def test_snapshot_round_trip_and_determinism():
    blob = P.pack_snapshot(SNAP)
    again = Snapshot(40, SNAP.theta.clone(), 0.25, dict(sorted(SNAP.scales.items())),
                     dict(sorted(SNAP.bans.items())), {"12D3KooWaaa": (12, 30)})
    assert blob == P.pack_snapshot(again) == P.pack_snapshot(SNAP.copy())
    assert same_snapshot(P.parse_snapshot(blob, N), SNAP)
    no_history = Snapshot(0, vec(3), None, {})
    assert same_snapshot(P.parse_snapshot(P.pack_snapshot(no_history), N), no_history)
    assert P.pack_snapshot(Snapshot(40, vec(1), 0.25, SNAP.scales, SNAP.bans,
                                    SNAP.strikes)) != blob  # θ counts
    unbanned = Snapshot(40, SNAP.theta, 0.25, SNAP.scales, {}, SNAP.strikes)
    assert P.pack_snapshot(unbanned) != blob  # so do the verdicts (donors vote on bytes)


def test_outer_round_trip_and_determinism():
    blob = P.pack_outer(OUTER)
    assert blob == P.pack_outer(OuterState(3, OUTER.phi.clone(), OUTER.momentum.clone()))
    assert same_outer(P.parse_outer(blob, N), OUTER)
    assert P.pack_outer(OuterState(4, OUTER.phi, OUTER.momentum)) != blob


def test_index_round_trip_and_determinism():
    blob = bytes(range(256)) * 20  # 5120 bytes: five chunks of 1024, the last full
    for chunk, sizes in ((1024, [1024] * 5), (2048, [2048, 2048, 1024]), (P.CHUNK, [5120])):
        data = P.make_index(7, blob, chunk)
        assert data == P.make_index(7, bytes(blob), chunk)
        idx = P.parse_index(data, 7, 1 << 20)
        assert (idx.tag, idx.size, idx.chunk) == (7, len(blob), chunk)
        assert [idx.chunk_size(i) for i in range(len(idx.hashes))] == sizes
        assert P.parse_index(data, None, 1 << 20) == idx  # any tag
    assert P.make_index(8, blob) != P.make_index(7, blob)


def test_log_round_trip_and_determinism():
    data = P.pack_log(LOG)
    shuffled = RecordLog(43, {t: dict(reversed(LOG.records[t].items()))
                              for t in reversed(LOG.records)})
    assert data == P.pack_log(shuffled)  # equal logs, equal bytes, whatever the order
    back = P.parse_log(data, 40)
    assert back == RecordLog(43, {t: r for t, r in LOG.records.items() if r})
    assert P.parse_log(P.pack_log(RecordLog(40, {})), 40) == RecordLog(40, {})


def test_sealed_log_round_trip_and_determinism():
    data = P.pack_sealed_log(43, ENVELOPES)
    assert data == P.pack_sealed_log(43, list(ENVELOPES))
    assert P.parse_sealed_log(data, 40) == (43, ENVELOPES)


def test_served_and_whole_states_round_trip():
    assert P.pack_served(SNAP) == P.pack_snapshot(SNAP)
    assert P.pack_served(OUTER) == P.pack_outer(OUTER)
    assert same_snapshot(P.parse_served(P.pack_served(SNAP), N), SNAP)
    assert same_outer(P.parse_served(P.pack_served(OUTER), N), OUTER)
    state = SPSAState(SNAP, LOG.closed, LOG.records)
    blob = P.pack_state(state)
    assert blob == P.pack_state(SPSAState(SNAP.copy(), 43, dict(reversed(LOG.records.items()))))
    back = P.parse_state(blob, N)
    assert isinstance(back, SPSAState) and same_snapshot(back.snap, SNAP)
    assert (back.closed, back.records) == (43, {t: r for t, r in LOG.records.items() if r})
    assert P.pack_state(OUTER) == P.pack_outer(OUTER)
    assert same_outer(P.parse_state(P.pack_state(OUTER), N), OUTER)


def test_a_young_spsa_state_round_trips():
    young = SPSAState(Snapshot(-1, vec(4)), 1, {0: {"p007": 5}, 1: {"p007": -5}})
    back = P.parse_state(P.pack_state(young), N)
    assert back.snap.step == -1 and back.records == young.records


def test_requests_round_trip():
    for op in P.OPS:
        for tag, index in ((0, 0), (40, 3), (P.MAX_STEP, 1 << 20)):
            data = P.pack_request(op, tag, index)
            assert len(data) <= P.REQUEST_LIMIT and P.parse_request(data) == (op, tag, index)
    assert P.pack_request("state") == P.pack_request("state", 0, 0)


# --- every decoder refuses what is not its format ---------------------------------------------

def snap_blob(**kw) -> bytes:
    s = Snapshot(kw.get("step", 40), kw.get("theta", vec(0)), kw.get("g2", 0.25),
                 kw.get("scales", {41: 1.5}))
    return P.pack_snapshot(s)


def raw_log(closed, peers, entries):
    return msgpack.packb([P.VERSION, "log", closed, peers, b"".join(
        P.ENTRY.pack(*e) for e in entries)], use_bin_type=True)


NAN, INF = float("nan"), float("inf")
GOOD = {
    "snapshot": (P.pack_snapshot(SNAP), lambda d: P.parse_snapshot(d, N)),
    "outer": (P.pack_outer(OUTER), lambda d: P.parse_outer(d, N)),
    "index": (P.make_index(40, bytes(5000), 1024), lambda d: P.parse_index(d, 40, 1 << 20)),
    "log": (P.pack_log(LOG), lambda d: P.parse_log(d, 40)),
    "sealed": (P.pack_sealed_log(43, ENVELOPES), lambda d: P.parse_sealed_log(d, 40)),
    "served": (P.pack_served(SNAP), lambda d: P.parse_served(d, N)),
    "served_outer": (P.pack_served(OUTER), lambda d: P.parse_served(d, N)),
    "state": (P.pack_state(SPSAState(SNAP, 43, LOG.records)), lambda d: P.parse_state(d, N)),
    "state_outer": (P.pack_state(OUTER), lambda d: P.parse_state(d, N)),
    "request": (P.pack_request("chunk", 40, 2), P.parse_request),
}
KIND = {"snapshot": "snap", "outer": "outer", "index": "index", "log": "log",
        "sealed": "sealed", "served": "snap", "served_outer": "outer", "state": "spsa",
        "state_outer": "outer"}


def expected(name: str) -> str:
    return "bad_request" if name == "request" else "bad_state"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_truncation_and_any_trailing_bytes_are_refused(name):
    blob, parse = GOOD[name]
    parse(blob)  # the untouched encoding is fine
    for k in range(len(blob)):
        assert reason(parse, blob[:k]) == expected(name), k
    for tail in (b"\x00", b"\xc0", b"\x91\x00", blob, b"\xc1"):  # \xc1: never valid msgpack
        assert reason(parse, blob + tail) == expected(name), tail


@pytest.mark.parametrize("name", sorted(GOOD))
def test_wrong_version_kind_and_shape_are_refused(name):
    blob, parse = GOOD[name]
    # The version is the first item of every format, the kind (a request's op) the second.
    # (A whole SPSA state's own version, and a non-bytes input to parse_state: see
    # test_a_whole_state_checks_its_version_and_input_type.)
    bad = [edit(blob, 0, v) for v in (0, 1, 3, -1, "1", None, 1 << 40) if name != "state"]
    if name == "request":
        bad += [edit(blob, 1, op) for op in ("rm", "INDEX", "chunks", "snap", "", 7, None)]
    else:
        bad += [edit(blob, 1, k) for k in ("snap", "outer", "index", "log", "sealed", "spsa",
                                           "request", "", 7, None, b"snap")
                if k != KIND[name]]
    longer = msgpack.unpackb(blob) + [0]
    bad += [edit(blob, -1, DROP), msgpack.packb(longer, use_bin_type=True),  # items
            msgpack.packb({"version": P.VERSION}), msgpack.packb(None), b"", b"\xff"]
    if not name.startswith("state"):
        bad += ["text", None, 40]
    for data in bad:
        assert reason(parse, data) == expected(name), data[:40]


def test_a_whole_state_checks_its_version_and_input_type():
    blob = P.pack_state(SPSAState(SNAP, 43, LOG.records))
    for v in (0, 1, 3, -1, "1", None, 1 << 40):
        assert reason(P.parse_state, edit(blob, 0, v), N) == "bad_state", v
    for data in ("text", None, 40):
        assert reason(P.parse_state, data, N) == "bad_state", data


def test_snapshot_sizes_values_and_ranges_are_checked():
    parse = lambda d, n=N: P.parse_snapshot(d, n)
    theta_nan, theta_inf = vec(0), vec(0)
    theta_nan[5], theta_inf[N - 1] = NAN, -INF
    for data in (
        snap_blob(theta=vec(0, N - 1)), snap_blob(theta=vec(0, N + 1)),
        snap_blob(theta=torch.zeros(0)),
        snap_blob(theta=theta_nan), snap_blob(theta=theta_inf),  # non-finite θ
        edit(snap_blob(), 3, NAN), edit(snap_blob(), 3, INF), edit(snap_blob(), 3, -1.0),
        edit(snap_blob(), 3, 1), edit(snap_blob(), 3, "0.5"),  # ĝ²: a finite float ≥ 0
        edit(snap_blob(), 4, [41, NAN]), edit(snap_blob(), 4, [41, -1.0]),
        edit(snap_blob(), 4, [41]),  # not pairs
        edit(snap_blob(), 4, [-1, 1.0]), edit(snap_blob(), 4, [1.5, 1.0]),
        edit(snap_blob(), 4, [41, 1.0] * (MAX_OPEN_STEPS + 1)),  # too many scales
        edit(snap_blob(), 2, -2), edit(snap_blob(), 2, P.MAX_STEP + 1),
        edit(snap_blob(), 2, 40.0), edit(snap_blob(), 2, True),
        edit(snap_blob(), 7, list(range(N))),  # θ as a list, not bytes
        edit(snap_blob(), 5, ["p007"]), edit(snap_blob(), 5, ["p007", -1]),  # bans
        edit(snap_blob(), 5, ["p007", 1.0]), edit(snap_blob(), 5, [7, 50]),
        edit(snap_blob(), 5, ["", 50]), edit(snap_blob(), 5, ["p" * 200, 50]),
        edit(snap_blob(), 5, ["p007", 50, "p007", 51]),  # banned twice
        edit(snap_blob(), 5, ["p007", 50] * (P.MAX_VERDICTS + 1)),
        edit(snap_blob(), 6, ["p007", 41]),  # a strike at a step that is not final
        edit(snap_blob(), 6, ["p007"]), edit(snap_blob(), 6, [["p007"], 3]),
    ):
        assert reason(parse, data) == "bad_state"
    assert reason(parse, snap_blob(), N + 1) == "bad_state"
    assert reason(parse, snap_blob(), 1 << 24) == "bad_state"  # a large receiver too


def test_outer_sizes_values_and_ranges_are_checked():
    nan = vec(1)
    nan[0] = NAN
    for data in (P.pack_outer(OuterState(3, vec(1, N - 1), vec(2))),
                 P.pack_outer(OuterState(3, vec(1), vec(2, N + 1))),
                 P.pack_outer(OuterState(3, nan, vec(2))),
                 P.pack_outer(OuterState(3, vec(1), torch.full((N,), INF))),
                 edit(P.pack_outer(OUTER), 2, -1), edit(P.pack_outer(OUTER), 2, 1 << 63),
                 edit(P.pack_outer(OUTER), 2, 3.0)):
        assert reason(P.parse_outer, data, N) == "bad_state"
    assert reason(P.parse_outer, P.pack_outer(OUTER), N - 1) == "bad_state"


def test_index_sizes_and_ranges_are_checked():
    data = P.make_index(40, bytes(5000), 1024)
    parse = lambda d, tag=40, limit=1 << 20: P.parse_index(d, tag, limit)
    assert reason(parse, data, 41) == "bad_state"  # another tag than asked for
    assert reason(parse, data, 40, 4999) == "bad_state"  # bigger than we take
    hashes = msgpack.unpackb(data)[5]
    for bad in (edit(data, 5, hashes[:-1]), edit(data, 5, hashes + b"\0"),
                edit(data, 5, hashes[:-32]),  # a chunk without its hash
                edit(data, 3, 0), edit(data, 3, -1), edit(data, 4, 1023),
                edit(data, 4, (1 << 24) + 1), edit(data, 2, -1), edit(data, 4, 0)):
        assert reason(parse, bad) == "bad_state"


def test_log_sizes_and_ranges_are_checked():
    peers = ["a", "b"]
    good = raw_log(43, peers, [(41, 0, 1), (42, 1, -1)])
    assert P.parse_log(good, 40) == RecordLog(43, {41: {"a": 1}, 42: {"b": -1}})
    for data in (
        raw_log(39, peers, []),  # closed before the snapshot it follows
        raw_log(40 + MAX_OPEN_STEPS + 1, peers, []),  # closed too far ahead
        raw_log(43, peers, [(40, 0, 1)]),  # a record of a step the snapshot holds
        raw_log(43, peers, [(43 + MAX_OPEN_STEPS + 1, 0, 1)]),  # too far ahead
        raw_log(43, peers, [(41, 2, 1)]),  # an author index past the peer ids
        raw_log(43, peers, [(41, 0, -Q_MAX - 1)]),  # |q| > Q_MAX (int8's -128)
        raw_log(43, peers, [(41, 0, 1), (41, 0, 2)]),  # one author twice in a step
        raw_log(43, ["a", "a"], []),  # a peer id twice
        raw_log(43, ["a", ""], []), raw_log(43, ["a", "x" * (P.MAX_PEER_ID + 1)], []),
        raw_log(43, ["a", 7], []), raw_log(43, "ab", []),
        edit(good, 4, good[-2 * P.ENTRY.size:][:-1]),  # entries not whole
        edit(good, 2, 43.0), edit(good, 2, -1),
    ):
        assert reason(P.parse_log, data, 40) == "bad_state", data[:60]


def test_sealed_log_sizes_and_ranges_are_checked():
    for data in (P.pack_sealed_log(39, []), P.pack_sealed_log(41 + MAX_OPEN_STEPS, []),
                 P.pack_sealed_log(43, [b"x" * (P.MAX_ENVELOPE + 1)]),
                 P.pack_sealed_log(43, ["text"]), edit(P.pack_sealed_log(43, []), 3, b"")):
        assert reason(P.parse_sealed_log, data, 40) == "bad_state"


def test_whole_state_pieces_are_checked():
    snap, log = P.pack_snapshot(SNAP), P.pack_log(LOG)
    whole = lambda s, lg: msgpack.packb([P.VERSION, "spsa", s, lg], use_bin_type=True)
    assert isinstance(P.parse_state(whole(snap, log), N), SPSAState)
    nan = SNAP.copy()
    nan.theta[0] = NAN
    for data in (whole(snap[:-1], log), whole(snap, log[:-1]), whole(snap, snap),
                 whole(log, log), whole(P.pack_snapshot(nan), log),
                 whole(snap, P.pack_log(RecordLog(39, {}))),  # the log precedes the snapshot
                 whole(P.pack_outer(OUTER), log),
                 msgpack.packb([P.VERSION, "spsa", snap, log, b""], use_bin_type=True),
                 msgpack.packb([P.VERSION, "outer", snap, log], use_bin_type=True)):
        assert reason(P.parse_state, data, N) == "bad_state"
    assert reason(P.parse_state, whole(snap, log), N + 1) == "bad_state"


def test_requests_are_checked():
    for data in (P.pack_request("index", -1), P.pack_request("index", P.MAX_STEP + 1),
                 P.pack_request("chunk", 40, -1), P.pack_request("chunk", 40, (1 << 20) + 1),
                 P.pack_request("nope"), msgpack.packb([1, "chunk", 40.0, 2]),
                 msgpack.packb(["chunk", 40, 2]),  # the old, unversioned request
                 b"byteswarm-state?",  # the old state request
                 msgpack.packb([1, "chunk", 40, 2, b"x" * 60])):  # over REQUEST_LIMIT
        assert reason(P.parse_request, data) == "bad_request"
    assert reason(P.parse_request, bytearray(P.pack_request("state"))[:-1]) == "bad_request"


# --- allocation bombs --------------------------------------------------------------------------

# Inputs that claim far more than they hold. msgpack.unpackb reserves a list for every
# array header it meets before reading a single item: with max_array_len=4096, the first
# bomb (10 kB of array16 headers, each claiming 4,096 items) peaks at ~33.6 MB under
# tracemalloc (msgpack 1.0.x measured here; it ends in StackError), which is why
# protocols/state.py walks the input with its strict Reader instead of unpacking it.
BOMBS = {
    "array16_headers_claiming_4096": b"\xdc\x10\x00" * 3400,
    "array32_headers_claiming_4g": b"\xdd\xff\xff\xff\xff" * 2000,
    "arrays_1000_deep": b"\x91" * 1000 + b"\x00",
    "map32_claiming_4g": b"\xdf\xff\xff\xff\xff" * 2000,
    "bin32_claiming_4g": b"\xc6\xff\xff\xff\xff" + b"\0" * 64,
    "bin32_claiming_64m": b"\xc6\x04\x00\x00\x00" + b"\0" * 64,
    "str32_claiming_4g": b"\xdb\xff\xff\xff\xff" + b"a" * 64,
    "ext32_claiming_4g": b"\xc9\xff\xff\xff\xff\x01" + b"\0" * 64,
}
PEAK = 1 << 20  # bytes: a Reader costs ~42 kB (msgpack's fixed parse stack), two at most
BIG = 1 << 24  # a large receiver: the bounds must not grow with it


def peak_of(fn, data) -> tuple[str, int]:
    tracemalloc.start()
    try:
        try:
            fn(data)
        except Rejected as e:
            got = e.reason
        else:
            got = "accepted"
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


DECODERS = {
    "snapshot": (lambda d: P.parse_snapshot(d, BIG), "snap", 8),
    "outer": (lambda d: P.parse_outer(d, BIG), "outer", 5),
    "index": (lambda d: P.parse_index(d, None, 4 * BIG), "index", 6),
    "log": (lambda d: P.parse_log(d, 0), "log", 5),
    "sealed": (lambda d: P.parse_sealed_log(d, 0), "sealed", 4),
    "served": (lambda d: P.parse_served(d, BIG), "snap", 8),
    "state": (lambda d: P.parse_state(d, BIG), "spsa", 4),
    "request": (P.parse_request, "chunk", 4),
}


def placed(name: str, bomb: bytes) -> list[bytes]:
    """``bomb`` alone, and where the decoder reads its kind and its first fields."""
    _, kind, items = DECODERS[name]
    top = bytes([0x90 | items]) + msgpack.packb(P.VERSION)
    head = top + msgpack.packb(kind)
    return [bomb, top + bomb, head + bomb, head + msgpack.packb(0) + bomb]


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_bombs_are_refused_within_a_megabyte(name):
    parse, _, _ = DECODERS[name]
    for bomb_name, bomb in BOMBS.items():
        for i, data in enumerate(placed(name, bomb)):
            if bomb_name == "arrays_1000_deep" and i > 0:
                continue  # inside a field: test_deep_nesting_inside_a_field_is_refused
            got, peak = peak_of(parse, data)
            assert got == expected(name), (bomb_name, i, got)
            assert peak < PEAK, (bomb_name, i, peak)
    # The bins a state holds, claimed at their full size and not sent: refused once the
    # input ends, nothing of the claimed size made.
    head = placed(name, b"")[2]
    for data in (snap_blob()[:-4 * N], head + b"\xc6" + (4 * BIG).to_bytes(4, "big")):
        got, peak = peak_of(parse, data)
        assert got == expected(name) and peak < PEAK, (got, peak)


def test_deep_nesting_inside_a_field_is_refused():
    for name, (parse, _, _) in sorted(DECODERS.items()):
        for data in placed(name, BOMBS["arrays_1000_deep"]):
            got, peak = peak_of(parse, data)
            assert got == expected(name) and peak < PEAK, (name, got, peak)


# --- the algorithms' side of the contract --------------------------------------------------------

@pytest.fixture(scope="module")
def workload():
    return load_workload(ModelConfig(), DataConfig(max_bytes=300_000, batch_size=4,
                                                     val_batches=1), seed=0)


def spsa(workload, peer="p0", steps=0):
    algo = A.make_algorithm("spsa", SPSAConfig(swarm="u"), peer, 0, 2, workload)
    for _ in range(steps):
        algo.on_local_step(0.0)
    return algo


def outer(workload, name, steps=0):
    cfg = (NoLoCoConfig if name == "noloco" else DiLoCoConfig)(inner_steps=4, warmup=0)
    algo = A.make_algorithm(name, cfg, "p0", 0, 2, workload)
    for _ in range(steps):
        algo.on_local_step(0.0)
    return algo


def test_spsa_import_of_a_wrong_state_changes_nothing(workload):
    algo = spsa(workload, steps=6)
    n = algo.theta.numel()
    before = (algo.fingerprint(), algo.final_mark(), algo.position(), algo.closed,
              {t: dict(r) for t, r in algo.records.items()})
    good = spsa(workload, peer="p1", steps=2).export_state()
    wrong = [OuterState(1, vec(0, n), vec(1, n)), SNAP, None, {"snap": good.snap},
             SPSAState(Snapshot(good.snap.step, vec(0, n + 1)), good.closed, {}),
             SPSAState(Snapshot(good.snap.step, vec(0, n - 1)), good.closed, {}),
             SPSAState(Snapshot(good.snap.step, vec(0, n).half()), good.closed, {}),
             SPSAState(Snapshot(good.snap.step, vec(0, n)), good.closed, {-5: {"p1": 1}}),
             SPSAState(Snapshot(good.snap.step, torch.full((n,), NAN)), good.closed, {})]
    for state in wrong:
        assert reason(algo.import_state, state) == "bad_state", type(state)
        assert (algo.fingerprint(), algo.final_mark(), algo.position(), algo.closed,
                algo.records) == before
    algo.import_state(good)  # and a good one is taken
    assert algo.position() == 2


@pytest.mark.parametrize("name", ["noloco", "diloco"])
def test_outer_import_of_a_wrong_state_changes_nothing(workload, name):
    algo = outer(workload, name, steps=2)
    n = algo.numel
    before = (algo.position(), algo.round, algo.phi.clone(), algo.export_state().momentum)
    wrong = [SPSAState(Snapshot(0, vec(0, n)), 0, {}), Snapshot(0, vec(0, n)), None,
             {"round": 1, "phi": vec(0, n), "momentum": vec(1, n)},
             OuterState(1, vec(0, n + 1), vec(1, n)), OuterState(1, vec(0, n), vec(1, n - 1)),
             OuterState(1, vec(0, n).double(), vec(1, n)), OuterState(-1, vec(0, n), vec(1, n)),
             OuterState(1.0, vec(0, n), vec(1, n)), OuterState(1, vec(0, n).view(8, -1), vec(1, n)),
             OuterState(1, vec(0, n), torch.full((n,), -INF))]
    for state in wrong:
        assert reason(algo.import_state, state) == "bad_state", type(state)
        assert (algo.position(), algo.round) == before[:2]
        assert torch.equal(algo.phi, before[2])
        assert torch.equal(algo.export_state().momentum, before[3])
    algo.import_state(OuterState(5, vec(0, n), vec(1, n)))  # and a good one is taken
    assert algo.position() == 5 * 4 and torch.equal(algo.phi, vec(0, n))


def test_spsa_checkpoint_round_trips_and_resumes(workload, tmp_path):
    a = spsa(workload, steps=7)
    save_checkpoint(tmp_path / "c.pt", {"state": a.state_dict()})
    b = spsa(workload)
    b.load_state_dict(load_checkpoint(tmp_path / "c.pt")["state"])
    assert b.fingerprint() == a.fingerprint() and b.final_mark() == a.final_mark()
    assert b.position() == a.position() == 7 and b.records == a.records
    assert b.snap.g2 == a.snap.g2 and b.snap.scales == a.snap.scales
    for algo in (a, b):  # it resumes: the next steps are the same bits
        for _ in range(3):
            algo.on_local_step(0.0)
    assert b.fingerprint() == a.fingerprint() and b.position() == a.position() == 10


@pytest.mark.parametrize("name", ["noloco", "diloco"])
def test_outer_checkpoint_round_trips_and_resumes(workload, tmp_path, name):
    a = outer(workload, name, steps=3)  # mid-round: inner_steps = 4
    save_checkpoint(tmp_path / "c.pt", {"state": a.state_dict()})
    b = outer(workload, name)
    b.load_state_dict(load_checkpoint(tmp_path / "c.pt")["state"])
    assert b.position() == a.position() == 3 and b.round == a.round
    assert b.inner.step_count == a.inner.step_count == 3
    assert torch.equal(b.phi, a.phi)
    assert torch.equal(b.export_state().momentum, a.export_state().momentum)
    for algo in (a, b):
        algo.on_local_step(0.0)
    assert b.inner.step_count == a.inner.step_count == 4
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)  # the inner optimizer's state came back too
