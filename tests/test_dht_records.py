"""Signed DHT records (protocols/records.py), the validator every node's DHT runs
(node/dhtrecords.py) and the membership reader (node/transport.py), without a network.
Records reach the validator exactly as hivemind hands them over: the key's DHTID, the
msgpack of the subkey and of the value. The network attack itself is tests/test_dht_attack.py.
"""

from __future__ import annotations

import pickle
import struct
import time
import tracemalloc
from collections import Counter
from types import SimpleNamespace

import msgpack
import pytest
from byteswarm.node.dhtrecords import PLAIN, SwarmRecords, dht_id
from byteswarm.node.swarm_cli import _candidates, printable
from byteswarm.node.transport import MAX_MARKS, Member, parse_members
from byteswarm.optim.sansio import Rejected
from byteswarm.protocols import manifest as M
from byteswarm.protocols import records as R
from byteswarm.protocols.signing import (
    pack,
    peer_id_of_key,
    public_key_bytes,
    sign_bytes,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

NOW = 1_000_000.0
ALICE = Ed25519PrivateKey.from_private_bytes(b"\x0a" * 32)
BOB = Ed25519PrivateKey.from_private_bytes(b"\x0b" * 32)
A_ID, B_ID = (peer_id_of_key(public_key_bytes(k)) for k in (ALICE, BOB))
KEY = R.peers_key("t")
BEAT = {"progress": 7, "client": False, "marks": [[5, "0123456789abcdef"]]}


def seal(key=ALICE, body=BEAT, expiration=NOW + 10, dht_key=KEY) -> bytes:
    return R.seal_entry(key, dht_key=dht_key, body=body, expiration=expiration)


def open_(data, subkey=A_ID, expiration=NOW + 10, now=NOW, dht_key=KEY) -> R.Entry:
    return R.open_entry(data, dht_key=dht_key, subkey=subkey, expiration=expiration, now=now)


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    return e.value.reason


def hand_sealed(body: bytes, key=ALICE, expiration=NOW + 10) -> bytes:
    """An entry built from the documented layout by hand, so any body bytes can be signed
    (and the test pins the format: a change to it fails here)."""
    sub, k = peer_id_of_key(public_key_bytes(key)).encode(), KEY.encode()
    payload = (len(k).to_bytes(2, "big") + k + len(sub).to_bytes(2, "big") + sub
               + struct.pack(">d", expiration) + body)
    return pack([1, body, expiration, sign_bytes(key, b"byteswarm/dht-record/v1\0", payload)])


# --- the entry format -------------------------------------------------------------------------

def test_entry_round_trip_and_layout():
    data = seal()
    assert data == hand_sealed(pack(BEAT))  # the documented layout, byte for byte
    entry = open_(data)
    assert entry.body == BEAT and entry.expiration == NOW + 10
    assert open_(data, expiration=NOW + 5).body == BEAT  # the DHT may expire it earlier
    assert 100 < len(data) < 250  # signed heartbeats cost a few hundred bytes


def test_only_the_signer_may_stand_under_its_subkey():
    assert reason(open_, seal(BOB)) == "bad_signature"  # Bob's entry under Alice's id
    assert open_(seal(BOB), subkey=B_ID).body == BEAT
    assert reason(open_, seal(), subkey="not a peer id") == "bad_peer_id"
    assert reason(open_, seal(), subkey=7) == "bad_peer_id"
    rsa_like = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # not an Ed25519 peer id
    assert reason(open_, seal(), subkey=rsa_like) == "bad_peer_id"
    # Signed for another swarm's key: not replayable into ours.
    assert reason(open_, seal(dht_key=R.peers_key("other"))) == "bad_signature"


def test_tampered_entries_are_refused():
    version, body, exp, sig = msgpack.unpackb(seal())
    tampered_body = pack(dict(BEAT, progress=10**9))
    assert reason(open_, pack([version, tampered_body, exp, sig])) == "bad_signature"
    later = exp + 5  # a later expiration than signed, in the entry and the DHT alike
    assert reason(open_, pack([version, body, later, sig]), expiration=later) == \
        "bad_signature"
    bent = sig[:-1] + bytes([sig[-1] ^ 1])
    assert reason(open_, pack([version, body, exp, bent])) == "bad_signature"
    assert reason(open_, pack([2, body, exp, sig])) == "bad_version"
    assert reason(open_, pack([version, body, int(exp), sig])) == "bad_field"
    assert reason(open_, pack([version, [1], exp, sig])) == "bad_field"
    assert reason(open_, pack([version, "str", exp, sig])) == "malformed"  # no strings
    assert reason(open_, pack([version, body, exp, sig[:10]])) == "bad_field"
    assert reason(open_, pack([version, body, exp])) == "malformed"
    assert reason(open_, seal() + b"\x00") == "malformed"  # trailing bytes
    assert reason(open_, seal()[:-3]) == "malformed"  # truncated


def test_expirations_are_capped_and_must_match_the_signed_one():
    far = NOW + 10 * 365 * 86400  # the attack: an entry that outlives its peer by years
    assert reason(open_, seal(expiration=far), expiration=far) == "too_far_ahead"
    edge = NOW + R.MAX_AHEAD
    assert open_(seal(expiration=edge), expiration=edge).expiration == edge
    assert reason(open_, seal(expiration=edge + 1), expiration=edge + 1) == "too_far_ahead"
    # A genuine entry re-stored with a later DHT expiration than its signature covers.
    assert reason(open_, seal(), expiration=far) == "expiration_mismatch"
    for bad in (float("inf"), float("nan"), "soon", None):
        assert reason(open_, seal(), expiration=bad) == "bad_expiration"
    assert reason(open_, hand_sealed(pack(BEAT), expiration=float("nan"))) == \
        "bad_expiration"
    assert R.MAX_AHEAD == 360.0  # documented in records.py and docs/security.md


def test_plain_values_and_oversized_entries_are_refused():
    for plain in (BEAT, "junk", 7, None, [1, 2]):  # what hivemind hands back for non-bytes
        assert reason(open_, plain) == "malformed"
    assert reason(open_, b"\x00" * (R.MAX_ENTRY + 1)) == "oversized"
    with pytest.raises(ValueError, match="heartbeat body"):  # our own bug: loud
        seal(body={"token": b"x" * R.MAX_BODY})
    with pytest.raises(ValueError, match="refused by our own reader"):  # not dropped quietly
        seal(body={"marks": [[t, "0123456789abcdef"] for t in range(R.MAX_ITEMS + 1)]})
    with pytest.raises(ValueError, match="refused by our own reader"):
        seal(body={"deep": [[[1]]]})
    # A signed body that is not a map of strings.
    assert reason(open_, hand_sealed(pack([1, 2, 3]))) == "bad_body"
    assert reason(open_, hand_sealed(b"\xc1")) == "bad_body"
    assert reason(open_, hand_sealed(pack({1: 2}))) == "bad_body"


def within_bounds(fn, data, limit: int = 1 << 20) -> str:
    """The reason ``fn(data)`` is refused for; its peak allocation must stay under
    ``limit`` and it must take well under a second."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        got = reason(fn, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes"
    assert time.perf_counter() - t0 < 1.0
    return got


BOMBS = {
    "arrays_4000_deep": b"\x91" * 4000 + b"\x00",
    "fixarrays_of_15": b"\x9f" * 4000,
    "arrays_of_64_deep": b"\xdc\x00\x40" * 1365,  # the most a body's bound allows
    "array32_claiming_4G": b"\xdd\xff\xff\xff\xff" + b"\x00" * 100,
    "map32_claiming_4G": b"\xdf\xff\xff\xff\xff" + b"\x00" * 100,
    "bin32_claiming_4G": b"\xc6\xff\xff\xff\xff" + b"\x00" * 100,
    "str32_claiming_4G": b"\xdb\xff\xff\xff\xff" + b"\x00" * 100,
    "ext32_claiming_4G": b"\xc9\xff\xff\xff\xff\x01" + b"\x00" * 100,
    "maps_1000_deep": b"\x81\xa1a" * 1000 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_msgpack_bombs_are_refused_within_bounds(name):
    bomb = BOMBS[name]
    assert within_bounds(open_, bomb) == "malformed"  # as the whole entry
    # As the body of a correctly signed entry: the signature passes, the body decoder
    # must refuse it as cheaply.
    assert within_bounds(open_, hand_sealed(bomb)) == "bad_body"
    # Inside the envelope, where the body's bytes would be.
    assert within_bounds(open_, b"\x94\x01" + bomb) == "malformed"


# --- the manifest rule ------------------------------------------------------------------------

CREATOR = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
MANIFEST = M.parse(f'name = "t"\nalgorithm = "spsa"\n'
                   f'creator = "{public_key_bytes(CREATOR).hex()}"\n')
SIGNED = M.sign(MANIFEST, CREATOR)
SID = SIGNED.swarm_id
BLOB = SIGNED.to_bytes()
FORGED = M.SignedManifest(MANIFEST, sign_bytes(BOB, M.SIGN_TAG, M.canonical_bytes(MANIFEST)))
OTHER = M.sign(M.parse(f'name = "u"\nalgorithm = "spsa"\n'
                       f'creator = "{public_key_bytes(CREATOR).hex()}"\n'), CREATOR)


def check_manifest(blob, expiration=NOW + 60):
    return R.check_manifest(blob, swarm_id=SID, expiration=expiration, now=NOW)


def test_the_manifest_key_takes_only_the_manifest_its_id_names():
    assert check_manifest(BLOB).name == "t"
    assert reason(check_manifest, OTHER.to_bytes()) == "id_mismatch"
    # The right bytes with a forged signature: public bytes, so this would win otherwise.
    assert reason(check_manifest, FORGED.to_bytes()) == "bad_signature"
    assert reason(check_manifest, b"junk") == "malformed"
    assert reason(check_manifest, {"a": 1}) == "malformed"
    assert reason(check_manifest, BLOB, NOW + 10 * 365 * 86400) == "too_far_ahead"
    assert reason(check_manifest, BLOB, float("inf")) == "bad_expiration"
    assert check_manifest(BLOB, NOW + R.MANIFEST_MAX_AHEAD).name == "t"


# --- the validator, fed as hivemind feeds it ---------------------------------------------------

def record(key: str, subkey, value, expiration: float) -> DHTRecord:
    """What hivemind's DHTProtocol builds (protocol.py ``_validate_record``, node.py
    ``store_many``): DHTID bytes, msgpack'd subkey (msgpack None for a plain value) and
    msgpack'd value."""
    return DHTRecord(dht_id(key), MSGPackSerializer.dumps(subkey),
                     MSGPackSerializer.dumps(value), expiration)


def test_validator_guards_the_membership_key():
    v = SwarmRecords("t", now=lambda: NOW)
    assert v.validate(record(KEY, A_ID, seal(), NOW + 10))
    assert v.validate(record(KEY, B_ID, seal(BOB), NOW + 10))
    far = NOW + 10 * 365 * 86400
    refused = {
        "plain junk value": record(KEY, None, b"junk", far),  # attack (a)
        "plain dict value": record(KEY, None, BEAT, far),
        "forged plain entry": record(KEY, A_ID, BEAT, far),  # attack (b), unsigned
        "Bob's entry under Alice": record(KEY, A_ID, seal(BOB), NOW + 10),  # signed
        "far future": record(KEY, A_ID, seal(expiration=far), far),
        "re-stored later": record(KEY, A_ID, seal(), far),
        "non-string subkey": record(KEY, 5, seal(), NOW + 10),
        "oversized": record(KEY, A_ID, b"\x00" * 100_000, NOW + 10),
    }
    for what, rec in refused.items():
        assert not v.validate(rec), what
    assert record(KEY, None, b"x", 0).subkey == PLAIN
    assert v.refused["peers:plain_value"] == 2 and v.refused["peers:malformed"] == 1
    assert v.refused["peers:bad_signature"] == 1 and v.refused["peers:too_far_ahead"] == 1
    assert v.refused["peers:expiration_mismatch"] == 1 and v.refused["peers:oversized"] == 1
    assert "too_far_ahead" in v.last["peers:too_far_ahead"]
    # Other keys, other swarms' keys, and (for a named swarm) a manifest key: not ours.
    assert v.validate(record("elsewhere", None, b"anything", far))
    assert v.validate(record(R.peers_key("u"), None, b"junk", far))
    assert v.validate(record(R.manifest_key("t"), None, b"junk", far))
    assert v.manifest_key is None


def test_validator_guards_a_public_swarms_manifest_key_and_pickles():
    v = SwarmRecords(SID, now=lambda: NOW)
    mkey = R.manifest_key(SID)
    assert v.validate(record(mkey, None, BLOB, NOW + 60))
    for rec in (record(mkey, None, b"junk", NOW + 60), record(mkey, None, OTHER.to_bytes(),
                NOW + 60), record(mkey, None, FORGED.to_bytes(), NOW + 60),
                record(mkey, None, BLOB, NOW + 10**8),  # the manifest, far ahead
                record(mkey, "sub", BLOB, NOW + 60),  # a dictionary entry would hide it
                record(mkey, None, "a string", NOW + 60)):
        assert not v.validate(rec)
    assert sorted(v.refused) == ["manifest:bad_signature", "manifest:id_mismatch",
                                 "manifest:malformed", "manifest:not_plain",
                                 "manifest:too_far_ahead"]
    # hivemind's DHT process may receive it pickled; the default clock is a module function.
    w = pickle.loads(pickle.dumps(SwarmRecords(SID)))
    now = time.time()
    assert w.validate(record(mkey, None, BLOB, now + 60))
    assert not w.validate(record(R.peers_key(SID), None, b"junk", now + 60))
    assert w.validate(record(R.peers_key(SID), A_ID,
                             seal(dht_key=R.peers_key(SID), expiration=now + 10), now + 10))


# --- the membership reader ---------------------------------------------------------------------

def item(value, expires):
    return SimpleNamespace(value=value, expiration_time=expires)


def test_members_are_verified_and_parsed_defensively():
    keys = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
            for i, name in enumerate(["alive", "expired", "client", "syncing", "odd_syncing",
                                      "bad_progress", "float_progress", "forged", "far"])}
    ids = {name: peer_id_of_key(public_key_bytes(k)) for name, k in keys.items()}
    ok = {"progress": 3, "client": False}
    bodies = {"alive": ok, "expired": ok, "client": {"progress": 0, "client": True},
              "syncing": {**ok, "syncing": True}, "odd_syncing": {**ok, "syncing": "yes"},
              "bad_progress": {"progress": -1, "client": False},
              "float_progress": {"progress": 1.5, "client": False}}
    found = {ids[n]: item(seal(keys[n], b, NOW + 10), NOW + 10) for n, b in bodies.items()}
    found[ids["expired"]] = item(seal(keys["expired"], ok, NOW - 1), NOW - 1)
    found[ids["forged"]] = item(seal(ALICE, dict(ok, progress=10**9)), NOW + 10)
    far = NOW + 10**8
    found[ids["far"]] = item(seal(keys["far"], ok, far), far)
    found["plain"] = item(ok, NOW + 10)  # the old, unsigned format
    found[7] = item(seal(), NOW + 10)
    rejects: Counter[str] = Counter()
    got = parse_members(item(found, NOW + 10), NOW, key=KEY, rejects=rejects)
    assert sorted(got) == sorted(ids[n] for n in ("alive", "client", "syncing",
                                                  "odd_syncing"))
    assert got[ids["alive"]] == Member(3, False)
    assert got[ids["client"]].client and got[ids["syncing"]].syncing
    assert not got[ids["odd_syncing"]].syncing
    assert rejects == Counter({"bad_body": 2, "bad_signature": 1, "too_far_ahead": 1,
                               "malformed": 1, "bad_peer_id": 1})
    # A plain value where the dictionary should be: nothing, and no crash.
    assert parse_members(item(b"junk", far), NOW, key=KEY) == {}
    assert parse_members(None, NOW, key=KEY) == {}


def test_member_marks_token_limit_and_cache():
    body = {"progress": 9, "client": False, "token": b"t" * 100,
            "marks": [[t, "0123456789abcdef"] for t in range(MAX_MARKS + 4)]}
    found = item({A_ID: item(seal(body=body), NOW + 10)}, NOW + 10)
    cache: dict = {}
    m = parse_members(found, NOW, key=KEY, cache=cache)[A_ID]
    assert m.token == b"t" * 100 and len(m.marks) == MAX_MARKS and m.progress == 9
    assert len(cache) == 1
    # A cached entry is not re-verified, but expiry is rechecked.
    assert parse_members(found, NOW, key=KEY, cache=cache)[A_ID] == m
    assert parse_members(found, NOW + 11, key=KEY, cache=cache) == {}
    many = {peer_id_of_key(public_key_bytes(
        Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big")))): None
        for i in range(1, 13)}
    many = {p: item(seal(Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big"))),
                    NOW + 10) for i, p in enumerate(many, start=1)}
    assert len(parse_members(item(many, NOW + 10), NOW, key=KEY, limit=10)) == 10


def test_join_reads_every_copy_and_prints_strangers_text_escaped():
    assert _candidates(None) == [] and _candidates(item(b"x", 1)) == [b"x"]
    assert _candidates(item({"a": item(b"1", 1), "b": item(b"2", 1)}, 1)) == [b"1", b"2"]
    evil = "id_mismatch: \x1b[2J\u202egnp.exe\nbyteswarm join: ok"
    safe = printable(evil)
    assert "\x1b" not in safe and "\n" not in safe and "\u202e" not in safe
    assert "\\x1b" in safe and "\\n" in safe and len(printable("x" * 1000)) == 300
