"""Swarm manifests: TOML in, canonical bytes and id out, signatures, admission tokens."""

import dataclasses
import hashlib

import msgpack
import pytest
from byteswarm.optim.config import ConfigError
from byteswarm.optim.model import ModelConfig
from byteswarm.optim.sansio import Rejected
from byteswarm.protocols import admission as A
from byteswarm.protocols import manifest as M
from byteswarm.protocols import swarmid
from byteswarm.protocols.msgshape import check_shape
from byteswarm.protocols.signing import public_key_bytes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CREATOR = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
FRIEND = Ed25519PrivateKey.from_private_bytes(b"\x22" * 32)
STRANGER = Ed25519PrivateKey.from_private_bytes(b"\x33" * 32)
C, F, X = (public_key_bytes(k) for k in (CREATOR, FRIEND, STRANGER))


def toml(**over: str) -> str:
    """A NoLoCo manifest; ``over`` replaces or adds top-level lines (value '' drops one)."""
    lines = {"name": '"tiny-noloco"', "algorithm": '"noloco"', "codec": '"int8"',
             "creator": f'"{C.hex()}"', "admission": '"allowlist"',
             "allowlist": f'["{F.hex()}"]'}
    lines.update(over)
    top = "\n".join(f"{k} = {v}" for k, v in lines.items() if v)
    return top + """
[model]
preset = "tiny"
[data]
batch_size = 16
[init]
seed = 3
[noloco]
inner_steps = 20
lr = 1
"""


@pytest.fixture(scope="module")
def signed():
    return M.sign(M.parse(toml()), CREATOR)


def reason(fn, *a, **kw):
    with pytest.raises(Rejected) as e:
        fn(*a, **kw)
    return e.value


def test_round_trip(signed, tmp_path):
    m = signed.manifest
    assert (m.name, m.algorithm, m.codec, m.allowlist, m.seed) == \
        ("tiny-noloco", "noloco", "int8", (F,), 3)
    assert m.model == ModelConfig(preset="tiny").resolved() and m.data.batch_size == 16
    blob = signed.to_bytes()
    assert len(blob) < 1000
    assert M.verify(blob, m.swarm_id) == m
    assert M.verify(signed, m.swarm_id) == m
    assert M.decode_signed(blob) == signed
    assert M.from_dict(M.to_dict(m)) == m
    cfg = m.algo_config(impl="reference")
    assert (cfg.inner_steps, cfg.lr, cfg.codec, cfg.impl) == (20, 1.0, "int8", "reference")
    path = tmp_path / "swarm.toml"
    path.write_text(toml())
    assert M.load(path) == m


def test_the_id_is_short_checksummed_and_ignores_spelling(signed):
    sid = signed.swarm_id
    assert sid.startswith("bs1") and len(sid) == 41 and sid == sid.lower()
    assert sid == swarmid.of_bytes(M.canonical_bytes(signed.manifest))
    assert swarmid.parse_swarm_id(f"  {sid.upper()} ") == sid
    # Stating the defaults, reordering, uppercase hex: the same manifest, the same id.
    same = toml(allowlist=f'["{F.hex().upper()}"]') + "alpha = 0.5\n"
    assert M.parse(same).swarm_id == sid
    assert M.parse(toml(name='"other"')).swarm_id != sid


def test_every_single_character_typo_in_an_id_is_caught(signed):
    sid = signed.swarm_id
    for i in range(3, len(sid)):
        for c in swarmid.BECH32:
            if c != sid[i]:
                with pytest.raises(ConfigError, match="mistyped"):
                    swarmid.parse_swarm_id(sid[:i] + c + sid[i + 1:])
    for bad, why in [(sid[:-1], "characters"), ("bc1" + sid[3:], "start with"),
                     (sid[:10] + "b" + sid[11:], "never appears"), (sid[:5] + sid[5:].upper(),
                                                                    "mixes")]:
        with pytest.raises(ConfigError, match=why):
            swarmid.parse_swarm_id(bad)


def test_bech32m_reference_vectors():
    # BIP-350's valid test vectors.
    for s in ["a1lqfn3a", "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
              "split1checkupstagehandshakeupstreamerranterredcaperredlc445v"]:
        assert swarmid.bech32m_valid(s)
    assert not swarmid.bech32m_valid("a1lqfn3q")


@pytest.mark.parametrize("field, value", [
    ("name", "tiny-noloco2"), ("algorithm", "diloco"), ("codec", "fp16"),
    ("admission", "open"), ("allowlist", ()), ("allowlist", (F, X)),
    ("model", ModelConfig(preset="small").resolved()), ("seed", 4),
    ("weights", "sha256:" + "ab" * 32), ("params", (("inner_steps", 21),)),
])
def test_a_manifest_changed_in_any_field_is_refused(signed, field, value):
    m = signed.manifest
    if field == "params":
        value = tuple((k, 21 if k == "inner_steps" else v) for k, v in m.params)
    if field == "algorithm":  # keep it valid: diloco's own table
        value, m = "diloco", dataclasses.replace(m, params=M.parse(
            toml(algorithm='"diloco"').replace("[noloco]", "[diloco]")).params)
    tampered = dataclasses.replace(m, **{field: value})
    e = reason(M.verify, M.SignedManifest(tampered, signed.signature), signed.swarm_id)
    assert e.reason == "id_mismatch" and "the manifest was changed" in str(e)


def test_changed_bytes_and_changed_data_are_refused(signed):
    v, canonical, sig = msgpack.unpackb(signed.to_bytes())
    d = msgpack.unpackb(canonical)
    d["data"]["batch_size"] = 17
    blob = msgpack.packb([v, M.canonical_bytes(M.from_dict(d)), sig])
    assert reason(M.verify, blob, signed.swarm_id).reason == "id_mismatch"
    assert reason(M.verify, signed.to_bytes(), "bs1" + "q" * 38).reason == "id_mismatch"
    flipped = bytearray(sig)
    flipped[0] ^= 1
    blob = msgpack.packb([v, canonical, bytes(flipped)])
    assert reason(M.verify, blob, signed.swarm_id).reason == "bad_signature"


def test_wrong_signers_are_refused(signed):
    m = signed.manifest
    with pytest.raises(ConfigError, match="not the manifest's creator"):
        M.sign(m, STRANGER)
    forged = M.SignedManifest(m, M.sign(dataclasses.replace(m, creator=X), STRANGER).signature)
    assert reason(M.verify, forged.to_bytes(), signed.swarm_id).reason == "bad_signature"
    # Re-signing under one's own creator key makes another swarm, not this one.
    mine = M.sign(dataclasses.replace(m, creator=X), STRANGER)
    assert M.verify(mine, mine.swarm_id).creator == X
    assert reason(M.verify, mine, signed.swarm_id).reason == "id_mismatch"


def test_old_manifests_missing_a_new_field_still_verify(signed):
    d = M.to_dict(signed.manifest)
    del d["noloco"]["max_phi_distance"]  # as if written before the field existed
    canonical = msgpack.packb(M._sorted(d), use_bin_type=True)
    m = M.from_canonical(canonical)
    assert m.swarm_id == swarmid.of_bytes(canonical) != signed.swarm_id
    assert M.verify(M.SignedManifest(m, M.sign(m, CREATOR).signature), m.swarm_id) == m
    # An edited copy of a decoded manifest is re-encoded, so it gets an id of its own.
    assert dataclasses.replace(m, seed=9).swarm_id not in (m.swarm_id, signed.swarm_id)
    # Not canonical: unsorted keys, or an int where a float belongs.
    unsorted = msgpack.packb(dict(reversed(M._sorted(d).items())), use_bin_type=True)
    assert reason(M.from_canonical, unsorted).reason == "not_canonical"
    d["noloco"]["lr"] = 1
    assert reason(M.from_canonical, msgpack.packb(M._sorted(d))).reason == "not_canonical"


def test_oversized_and_malformed_blobs(signed):
    assert reason(M.decode_signed, b"\x00" * (M.MAX_SIGNED + 1)).reason == "oversized"
    assert reason(M.decode_signed, signed.to_bytes()[:-1]).reason == "malformed"
    assert reason(M.decode_signed, msgpack.packb([2, b"", b"s" * 64])).reason == "bad_version"
    assert reason(M.decode_signed, msgpack.packb([1, b"\xc1", b"s" * 64])).reason == \
        "bad_manifest"


def test_admission_allowlist_and_tokens(signed):
    m, sid = signed.manifest, signed.swarm_id
    A.check_admission(m, C, now=0)  # the creator
    A.check_admission(m, F, now=0)  # allowlisted
    assert reason(A.check_admission, m, X, now=0).reason == "not_admitted"
    token = A.make_token(CREATOR, swarm_id=sid, member=X, expires=1000)
    assert len(token) < A.MAX_TOKEN
    A.check_admission(m, X, now=999, token=token)
    assert A.verify_token(token, swarm_id=sid, creator=C, now=0) == X
    assert reason(A.check_admission, m, X, now=1000, token=token).reason == "expired"
    other_member = A.make_token(CREATOR, swarm_id=sid, member=F)
    assert reason(A.check_admission, m, X, now=0, token=other_member).reason == "not_admitted"
    other_swarm = A.make_token(CREATOR, swarm_id="bs1" + "q" * 38, member=X)
    assert reason(A.check_admission, m, X, now=0, token=other_swarm).reason == "wrong_swarm"
    self_signed = A.make_token(STRANGER, swarm_id=sid, member=X)
    assert reason(A.check_admission, m, X, now=0, token=self_signed).reason == "bad_signature"
    # An open swarm admits anyone.
    A.check_admission(M.parse(toml(admission='"open"', allowlist="")), X, now=0)


def test_data_and_weights_files_are_pinned_by_hash(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world\n" * 1000)
    sha = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    m = M.parse(toml().replace("[data]\n", f'[data]\ncorpus = "{sha}"\n'))
    assert m.data_config(path).data == str(path)
    with pytest.raises(ConfigError, match="give its local path"):
        m.data_config()
    path.write_bytes(b"changed")
    with pytest.raises(ConfigError, match="is not the swarm's data file"):
        m.data_config(path)
    assert M.parse(toml()).data_config().data == "stdlib"
    w = M.parse(toml().replace("seed = 3", f'seed = 3\nweights = "{sha}"'))
    with pytest.raises(ConfigError, match="not the swarm's weights file"):
        w.check_weights(path)
    path.write_bytes(b"hello world\n" * 1000)
    w.check_weights(path)
    with pytest.raises(ConfigError, match="starts from its seed"):
        m.check_weights(path)


@pytest.mark.parametrize("text, message", [
    (toml(colour='"blue"'), "unknown key 'colour'"),
    (toml(name="3"), "name: expected a string"),
    (toml(name='"has space"'), "must be 1-64 letters"),
    (toml(name=""), "name must be set"),
    (toml(algorithm='"adam"'), "algorithm must be one of"),
    (toml(codec='"zip"'), "codec must be one of"),
    (toml(creator='"abc"'), "creator: expected an Ed25519 public key"),
    (toml(admission='"closed"'), "admission must be open or allowlist"),
    (toml(admission='"open"'), "allowlist given, but admission is 'open'"),
    (toml(allowlist=f'["{F.hex()}", "{F.hex()}"]'), "names a key twice"),
    (toml(allowlist='"x"'), "allowlist must be a list"),
    (toml(format="2"), "format 2 is not supported"),
    (toml() + "warmup = -1\n", "[noloco]: warmup: must be >= 0"),
    (toml() + "alpha = 'x'\n", "[noloco]: alpha: expected a number"),
    (toml() + "beta = 20.0\n", "[noloco]: beta: must be <= 10.0"),
    (toml() + "alpha = 0.9\n", "noloco"),  # the config's own stability check
    (toml() + "lr = 2.0\n", "not valid TOML"),  # lr is set twice
    (toml() + "impl = 'reference'\n", "impl cannot be set in a manifest"),
    (toml() + "codec = 'fp16'\n", "set codec at the top level"),
    (toml() + "bogus = 1\n", "[noloco]: unknown key 'bogus'"),
    (toml() + "[spsa]\neps = 0.1\n", "table [spsa] given, but algorithm is 'noloco'"),
    (toml(algorithm='"spsa"').replace("[noloco]\ninner_steps = 20\nlr = 1\n", ""),
     "spsa sends no tensors"),
    (toml(algorithm='"spsa"', codec='"none"').replace("[noloco]\ninner_steps = 20\nlr = 1\n",
                                                      "[spsa]\nswarm = 'x'\n"),
     "swarm cannot be set in a manifest"),
    (toml().replace("[data]\n", "[data]\ndata = '/tmp/x'\n"), "a local path cannot go"),
    (toml().replace("[data]\n", "[data]\ncorpus = 'sha256:xyz'\n"), "expected 'sha256:'"),
    (toml().replace("[data]\n", "[data]\nbatch_size = 0\n").replace("batch_size = 16\n", ""),
     "[data]: batch_size: must be >= 1"),
    (toml().replace("seed = 3", "seed = -1"), "seed must be an integer"),
    (toml().replace("seed = 3", "seed = 3\nwhen = 1"), "[init]: unknown key 'when'"),
    (toml().replace("preset = \"tiny\"", "preset = 'huge'"), "preset: must be one of"),
    (toml().replace("preset = \"tiny\"", "n_embd = 65"), "not divisible by n_head"),
    (toml(model="1").replace('[model]\npreset = "tiny"\n', ""), "[model]: must be a table"),
    ("name = ", "not valid TOML"),
])
def test_bad_toml_gives_one_clear_sentence(text, message):
    with pytest.raises(ConfigError) as e:
        M.parse(text, where="swarm.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("swarm.toml")


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        M.load(tmp_path / "nope.toml")


def test_the_stdlib_corpus_is_pinned_to_the_creators_bytes(signed, monkeypatch):
    m = signed.manifest
    small = dataclasses.replace(m, data=dataclasses.replace(m.data, max_bytes=200_000))
    pinned = small.pinned()
    pin = pinned.data.data
    assert pin.startswith("stdlib-") and pinned.swarm_id != small.swarm_id
    again = M.verify(M.sign(pinned, CREATOR).to_bytes(), pinned.swarm_id)
    assert again.data.data == pin and again.pinned() is again
    assert again.data_config().data == "stdlib"  # this machine: the same bytes
    # Another machine's standard library (a different hash) is refused before training.
    other = pin[:-64] + ("0" if pin[-1] != "0" else "1") * 64
    odd = dataclasses.replace(small, data=dataclasses.replace(small.data, data=other))
    odd = M.verify(M.sign(odd, CREATOR).to_bytes(), odd.swarm_id)
    with pytest.raises(ConfigError, match="standard library of Python .* Run byteswarm under"):
        odd.data_config()
    # The pin covers what is read: another size limit reads other bytes.
    bigger = dataclasses.replace(pinned.data, max_bytes=300_000)
    with pytest.raises(ConfigError, match="standard library"):
        M.check_stdlib_pin(pin, bigger)
    with pytest.raises(ConfigError, match="corpus"):
        M.parse(toml().replace("[data]\n", '[data]\ncorpus = "stdlib-3.11:sha256:00"\n'))


def test_shape_check_bounds_nesting_claims_and_framing(signed):
    canonical = M.canonical_bytes(signed.manifest)
    check_shape(canonical, M.MAX_DEPTH, "bad_manifest")  # a real manifest passes
    check_shape(canonical, 2, "bad_manifest")  # ... and nests only two deep
    with pytest.raises(Rejected, match="nested more than 1 deep"):
        check_shape(canonical, 1, "bad_manifest")
    deep = msgpack.packb({"model": [[[[0]]]]})  # 5 containers
    check_shape(msgpack.packb({"model": [[[0]]]}), M.MAX_DEPTH, "x")
    for blob, match in [(deep, "nested more than 4 deep"),
                        (b"\x92\x00", "claims 2 items"), (b"\x92\xa3ab", "truncated"),
                        (b"\xa5abc", "truncated"),
                        (b"\xc4\x05ab", "truncated"), (b"\x00\x00", "1 bytes after"),
                        (b"\xc1", "0xc1"), (b"\xdd\x00\x01\x00\x00\x00", "claims 65536 items")]:
        with pytest.raises(Rejected, match=match) as e:
            check_shape(blob, M.MAX_DEPTH, "bad_manifest")
        assert e.value.reason == "bad_manifest"
    # Every msgpack type the shape check skips over reads back as msgpack reads it.
    every = msgpack.packb([None, True, 1.5, -3, 1 << 40, -(1 << 40), "s" * 40, b"b" * 300,
                           msgpack.ExtType(5, b"e" * 3), msgpack.ExtType(6, b"x" * 16),
                           {"k": [1, {"m": 2}]}], use_bin_type=True)
    check_shape(every, 4, "x")
    with pytest.raises(Rejected):
        check_shape(every[:-1], 4, "x")


def test_deep_toml_and_deep_canonical_are_refused_not_crashed():
    with pytest.raises(ConfigError, match="nested too deeply"):
        M.parse("name = " + "[" * 1000 + "]" * 1000)
    assert reason(M.from_canonical, b"\x91" * 1000 + b"\x00").reason == "bad_manifest"
    assert reason(M.from_canonical, bytearray(M.MAX_SIGNED + 1)).reason == "bad_manifest"
    assert reason(M.from_canonical, "text").reason == "bad_manifest"


def test_a_user_task_is_named_in_the_manifest_and_pins_the_id(signed):
    text = toml().replace("seed = 3\n", 'seed = 3\ntask = "examples/hf_task.py:task"\n')
    m = M.parse(text)
    assert m.task == "examples/hf_task.py:task" and signed.manifest.task is None
    assert M.from_dict(M.to_dict(m)) == m
    assert m.swarm_id != signed.manifest.swarm_id  # another task, another swarm
    assert "task" not in M.to_dict(signed.manifest)["init"]  # old ids do not move
    s = M.sign(m, CREATOR)
    assert M.verify(s.to_bytes(), m.swarm_id).task == m.task
    for bad in ('"os"', '"a:b;rm -rf"', '"x:1y"', f'"{"m" * 200}:t"', "3"):
        with pytest.raises(ConfigError, match="task must be"):
            M.parse(toml().replace("seed = 3\n", f"seed = 3\ntask = {bad}\n"))
