"""Wire format: round trips, and every kind of junk rejected with its reason."""

import msgpack
import pytest
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Record
from byteswarm.protocols import wire
from hypothesis import given, settings
from hypothesis import strategies as st


def reason(data, **kw):
    with pytest.raises(Rejected) as e:
        wire.decode(data, swarm="s", **kw)
    return e.value.reason


def test_record_round_trip_and_size():
    r = Record(123456, "p0007", -17)
    data = wire.encode(r, swarm="s")
    assert wire.decode(data, swarm="s") == r
    assert len(data) <= 20  # a record is a handful of bytes on the wire


@pytest.mark.parametrize("obj, why", [
    ([2, 1, "s", [1, "p", 3]], "bad_version"),
    ([1, 99, "s", [1, "p", 3]], "unknown_type"),
    ([1, 1, "other", [1, "p", 3]], "wrong_swarm"),
    ([1, 1, "s", [1, "p", 128]], "bad_field"),
    ([1, 1, "s", [1, "p", -128]], "bad_field"),
    ([1, 1, "s", [-1, "p", 3]], "bad_field"),
    ([1, 1, "s", [1, "", 3]], "bad_field"),
    ([1, 1, "s", [1, "x" * 200, 3]], "bad_field"),
    ([1, 1, "s", [1.5, "p", 3]], "bad_field"),
    ([1, 1, "s", [True, "p", 3]], "bad_field"),
    ([1, 1, "s", [1, "p"]], "malformed"),
    ([1, 1, "s", {"a": 1}], "malformed"),
    ([1, 1, "s"], "malformed"),
    ({"v": 1}, "malformed"),
])
def test_bad_envelopes_and_fields(obj, why):
    assert reason(msgpack.packb(obj)) == why


def test_truncated_oversized_and_non_bytes():
    data = wire.encode(Record(1, "p", 1), swarm="s")
    assert reason(data[:-1]) == "malformed"
    assert reason(data + b"\x00") == "malformed"  # trailing bytes
    assert reason(data, max_bytes=len(data) - 1) == "oversized"
    assert reason(b"\xff" * 10) == "malformed"
    assert reason("text") == "malformed"
    # A header that claims a huge array must not allocate it.
    assert reason(b"\xdd\xff\xff\xff\xff") == "malformed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_rejected(data):
    try:
        wire.decode(data, swarm="s")
    except Rejected:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 19), st.integers(0, 255))
def test_mutated_records_decode_or_reject(pos, byte):
    data = bytearray(wire.encode(Record(99, "p0001", 5), swarm="s"))
    data[pos % len(data)] = byte
    try:
        r = wire.decode(bytes(data), swarm="s")
    except Rejected:
        return
    assert isinstance(r, Record) and -127 <= r.q <= 127 and r.step >= 0


def _compressed(codec, n, seed=0):
    import torch
    from byteswarm.optim.codecs import make_codec

    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return make_codec(codec).compress(x)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_tensor_messages_round_trip_and_are_checked_against_the_receiver(codec):
    import torch
    from byteswarm.optim.codecs import decompress
    from byteswarm.optim.diloco import GatherPart, ReducePart
    from byteswarm.optim.noloco import NoLoCoShare

    n = 1000
    ctx = wire.Context(numel=n)
    share = NoLoCoShare(3, _compressed(codec, n, 1), _compressed(codec, n, 2))
    back = wire.decode(wire.encode(share, swarm="s"), swarm="s", ctx=ctx)
    assert back.round == 3
    assert torch.equal(decompress(back.phi), decompress(share.phi))
    assert torch.equal(decompress(back.update), decompress(share.update))
    # The same bytes, received by a peer whose model has another size, are refused.
    with pytest.raises(Rejected, match="wrong_size"):
        wire.decode(wire.encode(share, swarm="s"), swarm="s", ctx=wire.Context(numel=999))
    part = ReducePart(1, 2, 4, _compressed(codec, 250))
    assert wire.decode(wire.encode(part, swarm="s"), swarm="s", ctx=ctx).part == 2
    bad = ReducePart(1, 2, 3, _compressed(codec, 250))  # part 2 of 3 has 333 elements
    with pytest.raises(Rejected, match="wrong_size"):
        wire.decode(wire.encode(bad, swarm="s"), swarm="s", ctx=ctx)
    gather = GatherPart(1, 0, 4, 3, _compressed(codec, 250))
    assert wire.decode(wire.encode(gather, swarm="s"), swarm="s", ctx=ctx).contributors == 3


def test_a_nan_share_and_an_oversized_one_are_rejected():
    import torch
    from byteswarm.optim.codecs import make_codec
    from byteswarm.optim.noloco import NoLoCoShare

    n = 64
    nan = make_codec("none").compress(torch.full((n,), float("nan")))
    share = NoLoCoShare(0, nan, _compressed("none", n))
    with pytest.raises(Rejected, match="non_finite"):
        wire.decode(wire.encode(share, swarm="s"), swarm="s", ctx=wire.Context(numel=n))
    big = NoLoCoShare(0, _compressed("none", 10 * n), _compressed("none", 10 * n))
    with pytest.raises(Rejected, match="oversized"):
        wire.decode(wire.encode(big, swarm="s"), swarm="s", ctx=wire.Context(numel=n))
