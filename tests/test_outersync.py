"""A NoLoCo/DiLoCo joiner's outer-state download, against donors' real stores and
algorithm objects (the transport is a direct call: tests/test_node_faults.py and
tests/test_node.py run it over hivemind)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
from byteswarm.node import algos as A
from byteswarm.node import outersync as O
from byteswarm.node import statesync as S
from byteswarm.optim.data import DataConfig
from byteswarm.optim.diloco import DiLoCoConfig
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.noloco import NoLoCoConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.workload import load_workload

N = 70_000  # elements: two fp32 vectors make three 256 kB chunks


@pytest.fixture(scope="module")
def workload():
    return load_workload(ModelConfig(), DataConfig(max_bytes=300_000, batch_size=4,
                                                     val_batches=1), seed=0)


class Direct:
    """Answers ``snap`` requests from each donor's store; ``lie`` bends one donor's chunks."""

    def __init__(self, stores: dict[str, S.SnapshotStore], lie: str | None = None):
        self.stores, self.lie, self.asked = stores, lie, Counter()

    async def request(self, peer, name, data, limit, timeout):
        op, step, index = S.parse_request(data)
        self.asked[peer, op] += 1
        reply = self.stores[peer].answer(op, step, index) or b""
        if op == "chunk" and peer == self.lie:
            reply = bytes([reply[0] ^ 1]) + reply[1:]
        if len(reply) > limit:
            raise ValueError("over the limit")
        return reply


def state(round_, second, seed):
    g = torch.Generator().manual_seed(seed)
    return {"round": round_, "phi": torch.randn(N, generator=g),
            second: torch.randn(N, generator=g)}


def store_of(*states):
    st = S.SnapshotStore()
    for s in states:
        st.add_outer(s["round"], lambda s=s: O.outer_blob(s))
    return st


def download(tr, donors):
    blame = Counter()
    got = asyncio.run(O.download_outer(tr, donors, N, blame))
    return (*got, blame)


def test_outer_bytes_are_deterministic_and_checked():
    s = state(3, "momentum", 0)
    blob = O.outer_blob(s)
    assert blob == O.outer_blob({k: (v.clone() if torch.is_tensor(v) else v)
                                 for k, v in s.items()})
    back = O.parse_outer(blob, N)
    assert back["round"] == 3 and torch.equal(back["phi"], s["phi"])
    assert torch.equal(back["momentum"], s["momentum"])
    for bad in (blob[:-1], b"junk", O.outer_blob(state(3, "delta", 0))[:-4]):
        with pytest.raises(Rejected):
            O.parse_outer(bad, N)
    with pytest.raises(Rejected):
        O.parse_outer(blob, N + 1)


def test_identical_donors_serve_chunks_together_and_a_liar_is_blamed():
    # DiLoCo: three peers that averaged round 4 together hold the same bytes; a fourth
    # is a round behind. The liar's chunks fail their hash and come from the others.
    same = state(4, "momentum", 1)
    stores = {p: store_of(state(3, "momentum", 9), same) for p in ("a", "b", "c")}
    stores["d"] = store_of(state(3, "momentum", 9))
    tr = Direct(stores, lie="a")
    got, served, how, blame = download(tr, ["a", "b", "c", "d"])
    assert how == "3 identical" and got["round"] == 4 and served == ["b", "c"]
    assert torch.equal(got["phi"], same["phi"]) and torch.equal(got["momentum"],
                                                                same["momentum"])
    assert blame["a"] >= 1 and tr.asked["d", "chunk"] == 0


def test_differing_donors_give_their_median(workload):
    # NoLoCo: each replica is its own; the joiner starts from the coordinate-wise median,
    # which a wild donor cannot drag outside the honest ones' range.
    honest = [state(2, "delta", k) for k in (1, 2)]
    wild = {"round": 2, "phi": 1e6 * torch.ones(N), "delta": -1e6 * torch.ones(N)}
    stores = {p: store_of(s) for p, s in zip("abc", [*honest, wild], strict=True)}
    got, served, how, _ = download(Direct(stores), ["a", "b", "c"])
    assert how == "median of 3" and served == ["a", "b", "c"]
    lo = torch.minimum(honest[0]["phi"], honest[1]["phi"])
    hi = torch.maximum(honest[0]["phi"], honest[1]["phi"])
    assert bool(((got["phi"] >= lo) & (got["phi"] <= hi)).all())
    # What came loads into a real NoLoCo replica, which starts round 2 from that φ.
    algo = A.make_algorithm("noloco", NoLoCoConfig(), "j", 0, 1, workload)
    n = algo.numel
    stores = {p: store_of({"round": 2, "phi": torch.randn(n), "delta": torch.zeros(n)})
              for p in "ab"}
    got, _, how, _ = download_n(Direct(stores), ["a", "b"], n)
    A.load_sync_state(algo, got)
    assert how == "median of 2" and algo.round == 2 and torch.equal(algo.phi, got["phi"])


def download_n(tr, donors, n):
    return (*asyncio.run(O.download_outer(tr, donors, n, Counter())), None)


def test_nothing_to_fetch_is_refused(workload):
    empty = {"a": S.SnapshotStore()}
    with pytest.raises(Rejected, match="no donor"):
        download(Direct(empty), ["a"])
    algo = A.make_algorithm("diloco", DiLoCoConfig(), "j", 0, 1, workload)
    with pytest.raises(Rejected):  # a NaN state passes the bytes but not the load
        bad = {"round": 1, "phi": torch.full((algo.numel,), float("nan")),
               "momentum": torch.zeros(algo.numel)}
        A.load_sync_state(algo, O.parse_outer(O.outer_blob(bad), algo.numel))
