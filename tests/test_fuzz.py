"""Fuzzing every decoder in protocols/ (DESIGN.md §6: decode, validate, bound, then use).

Each decoder gets random bytes and mutations of valid encodings: bit flips, byte changes,
truncation, extension, insertion, and structural edits made by unpacking the msgpack,
changing, swapping, dropping or duplicating a field (at any depth, including inside the
byte strings that hold nested msgpack), and packing it again. The properties:

1. nothing but the documented rejection type comes out (``Rejected``; ``ConfigError`` for
   the user-typed inputs: TOML and swarm ids);
2. memory stays bounded: tracemalloc's peak during a decode is below
   ``SLACK + FACTOR * len(input)``, so a header that claims a huge count is refused before
   anything of that size is made. (tracemalloc sees Python's allocations, including the
   bytearray each tensor is read into, not torch's own allocator; the tensor decoder's
   tests below therefore also call it with the size checks that precede any tensor.)
"""

import struct
import tracemalloc

import base58
import msgpack
import torch
from byteswarm.optim.codecs import make_codec
from byteswarm.optim.config import ConfigError
from byteswarm.optim.diloco import GatherPart, ReducePart, part_bounds
from byteswarm.optim.noloco import NoLoCoShare
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Record
from byteswarm.protocols import admission as A
from byteswarm.protocols import manifest as M
from byteswarm.protocols import signing as S
from byteswarm.protocols import swarmid, tensors, wire
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

B58 = base58.alphabet.decode()  # the alphabet of peer ids

FUZZ = settings(max_examples=300, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLACK = 64 * 1024  # bytes: exception objects, type-hint evaluation, small dicts
FACTOR = 16
N = 64  # the receiver's parameter count in these tests
CTX = wire.Context(numel=N)
BIG = wire.Context(numel=1 << 24)  # a large receiver: the bounds must not scale with it
KEY = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
ME = S.peer_id_of_key(S.public_key_bytes(KEY))


def bounded(fn, data, *, allowed=(Rejected,), extra: int = 0):
    """Call ``fn(data)``: it may return or raise ``allowed``; its peak allocation is
    bounded by the input's size (plus ``extra`` fixed bytes)."""
    tracemalloc.start()
    try:
        fn(data)
    except allowed:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= SLACK + extra + FACTOR * len(data), \
        f"{peak} bytes for a {len(data)}-byte input"


# --- valid encodings to start from -----------------------------------------------------------

def _compressed(codec, n=N, seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return make_codec(codec, **({"fraction": 0.1} if codec == "topk" else {})).compress(x)


TENSOR_SEEDS = [tensors.encode(_compressed(c)) for c in ("none", "fp16", "bf16", "int8", "topk")]
WIRE_SEEDS = [
    wire.encode(Record(12345, ME, -7), swarm="s"),
    *[wire.encode(NoLoCoShare(2, _compressed(c, seed=1), _compressed(c, seed=2)), swarm="s")
      for c in ("none", "int8", "topk")],
    wire.encode(ReducePart(4, 1, 3, _compressed("fp16", 21)), swarm="s"),
    wire.encode(GatherPart(4, 2, 3, 5, _compressed("int8", 21)), swarm="s"),
]
SEALED_SEEDS = [S.seal(m, swarm="s", key=KEY) for m in WIRE_SEEDS[:2] + WIRE_SEEDS[-1:]]
CREATOR = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
MANIFEST = M.from_dict({
    "name": "fuzz", "algorithm": "diloco", "codec": "int8", "admission": "allowlist",
    "creator": S.public_key_bytes(CREATOR).hex(), "allowlist": ["ab" * 32, "cd" * 32],
    "init": {"seed": 1, "weights": "sha256:" + "0" * 64}, "diloco": {"inner_steps": 9}})
SIGNED = M.sign(MANIFEST, CREATOR)
SID = SIGNED.swarm_id
TOKEN = A.make_token(CREATOR, swarm_id=SID, member=b"\xab" * 32, expires=10**9)


# --- mutations ----------------------------------------------------------------------------------

BOUNDARY_INTS = [0, 1, -1, 127, 128, -128, 255, 2**16 - 1, 2**16, 2**31 - 1, 2**32, 2**62,
                 2**63 - 1, 2**64 - 1, -(2**63)]
leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
          | st.integers(-3, 1 << 17) | st.floats() | st.text(max_size=12)
          | st.binary(max_size=24))
values = st.recursive(leaves, lambda c: st.lists(c, max_size=5)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


def _paths(obj, path=()):
    yield path
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, path + (i,))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _edit(draw, obj):
    """One structural change somewhere in an unpacked msgpack value (edited in place,
    except at the root, which is returned)."""
    paths = list(_paths(obj))
    path = draw(st.sampled_from(paths))
    node = _get(obj, path)
    kind = draw(st.sampled_from(["replace", "swap", "drop", "dup", "nudge", "inner"]))
    if kind == "inner" and isinstance(node, bytes) and node:
        new = draw(mutated_from(st.just(node)))  # nested msgpack, tensor payloads
    elif kind == "nudge" and type(node) is int:
        new = draw(st.sampled_from([node + 1, node - 1, -node, node * 2**32])
                   | st.sampled_from(BOUNDARY_INTS) | st.integers(-3, 1 << 17))
    elif kind in ("swap", "drop", "dup") and isinstance(node, list) and node:
        i, j = draw(st.integers(0, len(node) - 1)), draw(st.integers(0, len(node) - 1))
        new = list(node)
        if kind == "swap":
            new[i], new[j] = new[j], new[i]
        elif kind == "drop":
            del new[i]
        else:
            new.insert(j, new[i])
    elif kind == "drop" and isinstance(node, dict) and node:
        new = dict(node)
        del new[draw(st.sampled_from(sorted(new, key=repr)))]
    else:
        new = draw(values)
    if not path:
        return new
    _get(obj, path[:-1])[path[-1]] = new
    return obj


@st.composite
def mutated_from(draw, seeds):
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "repack",
                                   "repack"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[:pos]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "repack":
            try:
                obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
            except Exception:
                continue  # not msgpack (a tensor payload): byte-level ops only
            try:
                data = bytearray(msgpack.packb(_edit(draw, obj), use_bin_type=True))
            except (OverflowError, TypeError, ValueError):
                continue  # e.g. a dict key msgpack cannot pack
    return bytes(data)


def inputs(seeds):
    mutated = mutated_from(st.sampled_from(seeds))
    return st.one_of(st.binary(max_size=300), mutated, mutated)


# --- the decoders ---------------------------------------------------------------------------


@FUZZ
@given(inputs(WIRE_SEEDS))
def test_wire_decode_every_message_type(data):
    bounded(lambda d: wire.decode(d, swarm="s", ctx=CTX), data)
    bounded(lambda d: wire.decode(d, swarm="s", ctx=BIG), data)


def test_wire_seeds_decode():
    for data in WIRE_SEEDS:
        wire.decode(data, swarm="s", ctx=CTX)


def test_wire_int_fields_at_their_boundaries():
    # Every integer field of every message type, set to every boundary value: the
    # structured sweep that random mutation reaches only rarely.
    for seed in WIRE_SEEDS:
        obj = msgpack.unpackb(seed)
        for path in [p for p in _paths(obj) if type(_get(obj, p)) is int]:
            for value in BOUNDARY_INTS:
                edited = msgpack.unpackb(seed)
                _get(edited, path[:-1])[path[-1]] = value
                data = msgpack.packb(edited)
                for ctx in (CTX, BIG):
                    bounded(lambda d, c=ctx: wire.decode(d, swarm="s", ctx=c), data)


@FUZZ
@given(inputs(TENSOR_SEEDS))
def test_tensor_decode(data):
    bounded(lambda d: tensors.decode(d, expected_numel=N, max_bytes=4096), data)
    # Believe the header's element count (as if the receiver had that many parameters):
    # only the length checks stand between a huge claim and an allocation.
    if len(data) >= tensors.HEADER.size:
        numel = struct.unpack_from("<Q", data, 8)[0]
        bounded(lambda d: tensors.decode_compressed(d, expected_numel=numel,
                                                    max_bytes=1 << 62), data)


def test_a_tensor_header_claiming_a_huge_count_is_refused_before_allocation():
    for codec, dtype, aux in [(0, 0, 0), (3, 3, 256), (4, 0, 1 << 31)]:
        head = tensors.HEADER.pack(1, codec, dtype, 0, aux, 1 << 40)
        bounded(lambda d: tensors.decode_compressed(d, expected_numel=1 << 40,
                                                    max_bytes=1 << 62), head + b"\0" * 64)


@FUZZ
@given(st.one_of(inputs(SEALED_SEEDS),
                 # a member signing junk: the signature holds, the message must not
                 mutated_from(st.sampled_from(WIRE_SEEDS)).map(
                     lambda m: S.seal(m, swarm="s", key=KEY))))
def test_signed_envelope_decode(data):
    bounded(lambda d: S.open_signed(d, swarm="s", ctx=CTX), data)


@FUZZ
@given(inputs([SIGNED.to_bytes()]))
def test_signed_manifest_decode(data):
    bounded(M.decode_signed, data)
    bounded(lambda d: M.verify(d, SID), data)


def test_a_full_allowlist_decodes_within_bounds():
    keys = [bytes([i >> 8, i & 255]) * 16 for i in range(M.MAX_ALLOWLIST)]
    m = M.from_dict(dict(M.to_dict(MANIFEST), allowlist=[k.hex() for k in keys]))
    blob = M.sign(m, CREATOR).to_bytes()
    assert len(blob) <= M.MAX_SIGNED
    bounded(lambda d: M.verify(d, m.swarm_id), blob, allowed=())


@FUZZ
@given(inputs([M.canonical_bytes(MANIFEST)]))
def test_canonical_manifest_decode(data):
    bounded(M.from_canonical, data)


def _ok(b):
    try:
        msgpack.unpackb(b, strict_map_key=False)
        return True
    except Exception:
        return False


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(M.TOP + ("diloco", "spsa")), values,
                                         max_size=6),
                 mutated_from(st.just(M.canonical_bytes(MANIFEST))).map(
                     lambda b: msgpack.unpackb(b, strict_map_key=False) if _ok(b) else {})))
def test_manifest_fields_only_raise_config_error(d):
    try:
        M.from_dict(d)
    except ConfigError:
        pass


@FUZZ
@given(st.text(max_size=200))
def test_manifest_toml_only_raises_config_error(text):
    try:
        M.parse(text)
    except ConfigError:
        pass


@FUZZ
@given(inputs([TOKEN]))
def test_admission_token_decode(data):
    bounded(lambda d: A.verify_token(d, swarm_id=SID, creator=MANIFEST.creator, now=0), data)


@FUZZ
@given(st.one_of(st.text(max_size=80), st.text(alphabet=B58, max_size=70),
                 st.integers(0, 51).flatmap(lambda i: st.sampled_from(B58).map(
                     lambda c: ME[:i] + c + ME[i + 1:]))))
def test_peer_id_decode(text):
    bounded(lambda d: S.public_key_of_peer(d.decode()), text.encode())
    try:
        assert len(S.public_key_of_peer(text)) == S.KEY_BYTES
    except Rejected:
        pass


@FUZZ
@given(st.one_of(st.text(max_size=60), st.text(alphabet=swarmid.BECH32, max_size=45).map(
    lambda s: "bs1" + s)))
def test_swarm_id_parse_only_raises_config_error(text):
    try:
        assert swarmid.parse_swarm_id(text).startswith("bs1")
    except ConfigError:
        pass


@FUZZ
@given(st.integers(0, 1 << 40), st.integers(1, 1 << 16), st.data())
def test_part_sizes_agree_with_part_bounds(numel, n_parts, data):
    # wire.py computes one part's size without building all n_parts bounds (a fuzz find).
    if n_parts > max(numel, 1) or n_parts > 4096:
        return
    part = data.draw(st.integers(0, n_parts - 1))
    lo, hi = part_bounds(numel, n_parts)[part]
    assert wire._part_numel(wire.Context(numel=numel), part, n_parts) == hi - lo


# --- state downloads (protocols/state.py; node/sealing.py opens sealed logs) -------------

def _state_seeds():
    from byteswarm.node.sealing import Sealer
    from byteswarm.optim.inner import OuterState
    from byteswarm.optim.spsa import RecordLog, Snapshot, SPSAState
    from byteswarm.protocols import state as P

    snap = Snapshot(40, torch.arange(N, dtype=torch.float32), 0.5, {41: 1.0})
    blob = P.pack_snapshot(snap)
    outer = P.pack_outer(OuterState(3, torch.ones(N), torch.zeros(N)))
    log = RecordLog(42, {41: {ME: 1}, 42: {ME: -2}})
    sealer = Sealer(KEY, "s", CTX)
    for t in (41, 42):
        rec = Record(t, ME, t)
        sealer.keep(rec, sealer.seal(rec), 0, 100)
    return {"request": [P.pack_request("chunk", 40, 2), P.pack_request("latest"),
                        P.pack_request("state")],
            "index": [P.make_index(40, blob)], "snapshot": [blob], "outer": [outer],
            "served": [blob, outer], "log": [P.pack_log(log)],
            "state": [P.pack_state(SPSAState(snap, log.closed, log.records)), outer],
            "sealed": [sealer.log_blob(RecordLog(42, {41: {ME: 41}, 42: {ME: 42}}))]}


STATE = _state_seeds()


@FUZZ
@given(st.data())
def test_state_download_decoders(data):
    from byteswarm.node.sealing import Sealer
    from byteswarm.protocols import state as P

    sealer = Sealer(KEY, "s", CTX)
    decoders = {"request": P.parse_request,
                "index": lambda d: P.parse_index(d, None, 1 << 20),
                "snapshot": lambda d: P.parse_snapshot(d, N),
                "outer": lambda d: P.parse_outer(d, N),
                "served": lambda d: P.parse_served(d, N),
                "log": lambda d: P.parse_log(d, 40),
                "state": lambda d: P.parse_state(d, N),
                "sealed": lambda d: sealer.parse_log(d, 40)}
    name = data.draw(st.sampled_from(sorted(decoders)))
    _bounded_readers(decoders[name], data.draw(inputs(STATE[name])),
                     2 if name in ("served", "state") else 1)


def _reader_cost() -> int:
    """tracemalloc's peak for one msgpack.Unpacker, whatever it reads: ~42 kB, its parse
    stack (a fixed-size array inside the object)."""
    tracemalloc.start()
    try:
        msgpack.Unpacker(max_buffer_size=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


READER = _reader_cost()


def _bounded_readers(fn, data, readers):
    """``bounded``, where ``readers`` protocols.state Readers are alive at once (a whole
    state and a served state read their outer array, then hand each piece to its own
    parser): each costs a fixed ``READER`` bytes, none grows with what a header claims."""
    bounded(fn, data, extra=(readers - 1) * READER)


# --- bombs: nesting and header claims that msgpack's length limits alone do not bound ------

def _rejected_within_bounds(fn, data):
    """``fn(data)`` raises Rejected (not RecursionError, not MemoryError) and its peak
    allocation stays within this file's bound, far below the megabytes a bomb asks for."""
    tracemalloc.start()
    try:
        try:
            fn(data)
        except Rejected as e:
            reason = e.reason
        else:
            raise AssertionError("a bomb was accepted")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= min(5 << 20, SLACK + FACTOR * len(data)), f"{peak} bytes"
    return reason


def _in_manifest(inner: bytes) -> bytes:
    """``inner`` as the value of [model] in an otherwise plausible canonical map."""
    return b"\x82\xa6format\x01\xa5model" + inner


BOMBS = {
    "arrays_1000_deep": b"\x91" * 1000 + b"\x00",
    "maps_1000_deep": b"\x81\xa1a" * 1000 + b"\x00",
    "arrays_1000_deep_inside_a_table": _in_manifest(b"\x91" * 1000 + b"\x00"),
    # 10 kB of array16 headers, each claiming the most items max_array_len allows: msgpack
    # reserved a list of that size per level, about 8 MB, before its stack ran out.
    "array_headers_claiming_1000": b"\xdc\x03\xe8" * 3400,
    "array32_headers_claiming_4g": b"\xdd\xff\xff\xff\xff" * 2000,
    "map32_headers_claiming_4g": _in_manifest(b"\xdf\xff\xff\xff\xff" * 2000),
    "maps_and_arrays_alternating": b"\x81\xa1a\x91" * 2500,
}


def test_manifest_bombs_are_rejected_within_bounds():
    for name, bomb in BOMBS.items():
        assert _rejected_within_bounds(M.from_canonical, bomb) == "bad_manifest", name
        signed = msgpack.packb([M.FORMAT, bomb, b"\0" * 64], use_bin_type=True)
        assert _rejected_within_bounds(M.decode_signed, signed) == "bad_manifest", name
        # verify hashes before it parses: a bomb under the right id is parsed all the same.
        sid = swarmid.of_bytes(bomb)
        assert _rejected_within_bounds(lambda d, sid=sid: M.verify(d, sid),
                                       signed) == "bad_manifest", name


def test_signed_envelope_bombs_are_rejected_within_bounds():
    for bomb in (b"\x91" * 1000 + b"\x00", b"\x93" * 3000, b"\xdd\xff\xff\xff\xff" * 2000):
        assert _rejected_within_bounds(M.decode_signed, bomb) == "malformed"
        assert _rejected_within_bounds(lambda d: M.verify(d, SID), bomb) == "malformed"


@FUZZ
@given(st.lists(st.sampled_from([b"\x91", b"\x81\xa1a", b"\xdc\x03\xe8", b"\xdf\x00\x10",
                                 b"\x92\x00"]), min_size=1, max_size=1500),
       st.binary(max_size=8))
def test_nested_headers_never_escape_as_anything_but_rejected(headers, tail):
    data = _in_manifest(b"".join(headers) + tail)
    bounded(M.from_canonical, data)
