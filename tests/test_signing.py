"""Signed contributions, replay protection, peer id <-> key, and ``byteswarm keygen``."""

import os
import stat

import msgpack
import pytest
import torch
from byteswarm.optim.codecs import make_codec
from byteswarm.optim.diloco import ReducePart
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Record
from byteswarm.protocols import signing as S
from byteswarm.protocols import wire
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ME = S.peer_id_of_key(S.public_key_bytes(KEY))


def sealed_record(step=7, q=-3, peer=ME, swarm="s", key=KEY):
    return S.seal(wire.encode(Record(step, peer, q), swarm=swarm), swarm=swarm, key=key)


def reason(fn, *a, **kw):
    with pytest.raises(Rejected) as e:
        fn(*a, **kw)
    return e.value.reason


def test_a_signed_record_round_trips_and_names_its_signer():
    data = sealed_record()
    signer, msg = S.open_signed(data, swarm="s")
    assert signer == ME and msg == Record(7, ME, -3)
    assert S.open_signed(data, swarm="s", expect=ME)[1] == msg
    assert len(data) <= len(wire.encode(msg, swarm="s")) + S.MAX_OVERHEAD


def test_a_signed_tensor_message_round_trips():
    part = ReducePart(3, 1, 4, make_codec("int8").compress(torch.randn(25)))
    data = S.seal(wire.encode(part, swarm="s"), swarm="s", key=KEY)
    signer, back = S.open_signed(data, swarm="s", ctx=wire.Context(numel=100))
    assert signer == ME and (back.round, back.part, back.n_parts) == (3, 1, 4)


def test_every_flipped_byte_is_refused():
    data = sealed_record()
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(Rejected):
                S.open_signed(bytes(bad), swarm="s")


def test_a_signature_is_bound_to_swarm_signer_and_author():
    data = sealed_record(swarm="a")
    # The inner message names swarm "a" too, but the signature is checked first.
    assert reason(S.open_signed, data, swarm="b") == "bad_signature"
    assert reason(S.open_signed, sealed_record(), swarm="s", expect="12D3KooWother") == \
        "wrong_signer"
    # OTHER signs a record that claims to be ME's: a valid signature, but not the author's.
    assert reason(S.open_signed, sealed_record(key=OTHER), swarm="s") == "wrong_signer"
    # Swapping in another key leaves the signature invalid.
    v, _, message, sig = msgpack.unpackb(sealed_record())
    swapped = msgpack.packb([v, S.public_key_bytes(OTHER), message, sig])
    assert reason(S.open_signed, swapped, swarm="s") == "bad_signature"


@pytest.mark.parametrize("obj, why", [
    ([2, b"k" * 32, b"m", b"s" * 64], "bad_version"),
    ([1, b"k" * 31, b"m", b"s" * 64], "bad_field"),
    ([1, b"k" * 32, "m", b"s" * 64], "malformed"),  # no strings at all in an envelope
    ([1, b"k" * 32, b"m", b"s" * 63], "bad_field"),
    ([1, b"k" * 32, b"m"], "malformed"),
    ({"v": 1}, "malformed"),
])
def test_bad_envelopes(obj, why):
    assert reason(S.open_signed, msgpack.packb(obj), swarm="s") == why


def test_oversized_envelopes_are_refused_before_parsing():
    assert reason(S.open_signed, b"\x00" * (S.max_signed_bytes() + 1), swarm="s") == "oversized"
    assert reason(S.open_signed, sealed_record(), swarm="s", max_bytes=10) == "oversized"


def test_peer_ids_and_public_keys_are_inverse():
    from byteswarm.node.identity import peer_id_of, public_key_of
    from hivemind.p2p import PeerID

    for seed in range(20):
        pub = S.public_key_bytes(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))
        pid = peer_id_of(pub)  # hivemind's encoder
        assert pid.startswith("12D3KooW") and S.peer_id_of_key(pub) == pid
        assert public_key_of(pid) == pub
        assert PeerID.from_base58(pid).to_bytes() == S.PEER_ID_PREFIX + pub


@pytest.mark.parametrize("junk", [
    "", "0OIl", "12D3KooW", "x" * 65, 42, None,
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # an RSA (sha256 multihash) peer id
    S.peer_id_of_key(b"\x01" * 32)[:-1] + "z",  # one character changed: another key's id?
])
def test_bad_peer_ids_are_refused(junk):
    from byteswarm.node.identity import public_key_of

    if isinstance(junk, str) and junk.startswith("12D3KooW") and len(junk) == 52:
        assert public_key_of(junk) != b"\x01" * 32  # a valid encoding of some other key
        return
    assert reason(public_key_of, junk) == "bad_peer_id"


def test_keygen_writes_a_private_key_and_prints_who_it_is(tmp_path, capsys):
    from byteswarm.node.cli import main
    from byteswarm.node.identity import load_identity, peer_id_of

    path = tmp_path / "keys" / "me.key"
    assert main(["keygen", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pub = S.public_key_bytes(load_identity(path))
    assert f"peer id:    {peer_id_of(pub)}" in out and f"public key: {pub.hex()}" in out
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
