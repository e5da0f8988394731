"""Sealed frames and sealed SPSA record logs (node/sealing.py), wired directly."""

from __future__ import annotations

import msgpack
import pytest
from byteswarm.node.sealing import Sealer
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Record, RecordLog
from byteswarm.protocols import signing, wire
from byteswarm.protocols import state as P
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CTX = wire.Context(numel=1000)


def sealer(**kw) -> tuple[Sealer, str]:
    key = Ed25519PrivateKey.generate()
    return Sealer(key, "s", CTX, **kw), signing.peer_id_of_key(signing.public_key_bytes(key))


def reason(fn, *args) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args)
    return e.value.reason


def test_a_sealed_frame_opens_only_as_its_senders_and_unbent():
    (a, pa), (b, pb) = sealer(), sealer()
    rec = Record(7, pa, -3)
    data = a.seal(rec)
    assert b.open(data, pa) == rec
    assert reason(b.open, data, pb) == "wrong_signer"  # relayed as if b's own
    bent = bytearray(data)
    bent[-70] ^= 1  # inside the message: the signature no longer covers it
    assert reason(b.open, bytes(bent), pa) == "bad_signature"
    assert reason(b.open, wire.encode(rec, swarm="s"), pa) == "malformed"  # unsealed
    # a's key cannot vouch for a record that names b
    assert reason(b.open, a.seal(Record(7, pb, 1)), pa) == "wrong_signer"
    other_swarm = Sealer(a.key, "t", CTX)
    assert reason(b.open, other_swarm.seal(Record(7, pa, 1)), pa) == "bad_signature"


def test_sealed_logs_carry_checked_records_and_no_invented_ones():
    (a, pa), (b, pb), (joiner, _) = sealer(), sealer(), sealer()
    for t in (41, 42, 43):
        a.keep(Record(t, pa, t), a.seal(Record(t, pa, t)), 0, 100)
        a.keep(Record(t, pb, -t), b.seal(Record(t, pb, -t)), 0, 100)
    held = RecordLog(43, {41: {pa: 41, pb: -41}, 42: {pa: 42, pb: -42}, 43: {pa: 43}})
    log = joiner.parse_log(a.log_blob(held), 40)  # held: the algorithm's log
    assert log == held
    assert joiner.stats()["log_records"] == 5 and joiner.stats()["refused_authors"] == 0
    # Only records the algorithm holds are served, and only those we hold as signed.
    assert joiner.parse_log(a.log_blob(RecordLog(43, {42: {pa: 42}, 44: {pa: 1}})), 40) \
        == RecordLog(43, {42: {pa: 42}})
    # A donor that changes a byte of someone's record is caught, whatever it changed.
    closed, sealed = P.parse_sealed_log(a.log_blob(held), 40)
    assert closed == 43 and len(sealed) == 5
    env = signing.open_envelope(sealed[1], max_bytes=1 << 10)
    forged = msgpack.packb([1, env.signer, wire.encode(Record(41, pb, 99), swarm="s"),
                            env.signature])
    blob = P.pack_sealed_log(43, [sealed[0], forged])
    assert reason(joiner.parse_log, blob, 40) == "bad_signature"
    # Records at or before the snapshot, or an unsigned log as an unsigned swarm serves it.
    assert reason(joiner.parse_log, a.log_blob(held), 41) == "bad_state"
    assert reason(joiner.parse_log, P.pack_log(held), 40) == "bad_state"


def test_a_sealed_log_brings_back_no_author_the_swarm_refuses():
    (a, pa), (b, pb) = sealer(), sealer()
    for t in (41, 42):
        for s, p in ((a, pa), (b, pb)):
            a.keep(Record(t, p, t), s.seal(Record(t, p, t)), 0, 100)
    held = RecordLog(42, {41: {pa: 41, pb: 41}, 42: {pa: 42, pb: 42}})
    joiner, _ = sealer(may_author=lambda peer: peer != pb)  # b is banned, or not admitted
    log = joiner.parse_log(a.log_blob(held), 40)
    assert log == RecordLog(42, {41: {pa: 41}, 42: {pa: 42}})
    assert joiner.stats()["refused_authors"] == 2
    assert (42, pb) not in joiner.kept and (42, pa) in joiner.kept  # nor kept to serve on


def test_kept_records_stay_within_the_window():
    a, pa = sealer()
    for t in range(0, 200):
        a.keep(Record(t, pa, 1), a.seal(Record(t, pa, 1)), t - 50, t + 4)
    a.keep(Record(10**6, pa, 1), a.seal(Record(10**6, pa, 1)), 150, 204)  # far ahead
    steps = sorted(t for t, _ in a.kept)
    assert steps[-1] == 199 and steps[0] >= 199 - 50 - 16 and len(steps) <= 50 + 16 + 1
    a.keep("not a record", b"", 0, 10)  # other messages are not kept
    assert len(a.kept) == len(steps)
