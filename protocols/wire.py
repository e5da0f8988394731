"""Messages to bytes and back: msgpack, a version and a type on every message.

Layout (a msgpack array): ``[version, type, swarm, body]``, where ``body`` is the type's own
array. ``decode`` validates in this order and stops at the first problem, raising
``Rejected(reason)`` with a stable reason key that drivers count:

1. size (``oversized``) before any parsing, and msgpack's own limits on lengths;
2. shape (``malformed``), version (``bad_version``), type (``unknown_type``), swarm
   (``wrong_swarm``);
3. the body, by the type's validator (``bad_field`` and type-specific reasons).

Nothing from the network reaches an algorithm object without passing all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from byteswarm.optim.diloco import GatherPart, ReducePart
from byteswarm.optim.noloco import NoLoCoShare
from byteswarm.optim.sansio import Rejected
from byteswarm.optim.spsa import Q_MAX, Record

from . import tensors

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes; tensor payloads travel as streams of their own
MAX_ID = 128  # characters in a peer id or swarm name
MAX_STEP = 1 << 62
MAX_FIELDS = 8  # elements in any msgpack array of a message (envelope 4, bodies <= 5)


@dataclass(frozen=True)
class Context:
    """What the receiver knows that a message's size must agree with."""

    numel: int = 0  # length of the receiver's own flat parameter vector


@dataclass(frozen=True)
class Codec:
    type_id: int
    cls: type
    to_body: Callable[[Any], list]
    from_body: Callable[[list, Context], Any]
    max_bytes: Callable[[Context], int] = lambda ctx: MAX_MESSAGE


_BY_TYPE: dict[int, Codec] = {}
_BY_CLASS: dict[type, Codec] = {}


def register(codec: Codec) -> None:
    if codec.type_id in _BY_TYPE or codec.cls in _BY_CLASS:
        raise RuntimeError(f"message type {codec.type_id} / {codec.cls} registered twice")
    _BY_TYPE[codec.type_id] = codec
    _BY_CLASS[codec.cls] = codec


def encode(msg: Any, *, swarm: str) -> bytes:
    codec = _BY_CLASS[type(msg)]  # KeyError: our bug (an unregistered message type)
    return msgpack.packb([VERSION, codec.type_id, swarm, codec.to_body(msg)],
                         use_bin_type=True)


def max_message_bytes(ctx: Context = Context()) -> int:
    """The largest message any registered type can be for this context."""
    return max(c.max_bytes(ctx) for c in _BY_TYPE.values())


def decode(data: bytes, *, swarm: str, ctx: Context = Context(),
           max_bytes: int | None = None) -> Any:
    """Bytes to a message, or Rejected(reason). ``max_bytes`` defaults to the largest
    message any registered type can be for this context."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", "not bytes")
    if max_bytes is None:
        max_bytes = max_message_bytes(ctx)
    if len(data) > max_bytes:
        raise Rejected("oversized", f"{len(data)} > {max_bytes} bytes")
    try:
        # The input is already bounded; these bound what a header may claim inside it.
        # msgpack allocates an array's slots when it reads the header, so a 3-byte input
        # claiming 65535 elements cost 80 kB: no message has more than MAX_FIELDS.
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                              max_str_len=max_bytes, max_bin_len=max_bytes,
                              max_array_len=MAX_FIELDS, max_map_len=0, max_ext_len=0)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise Rejected("malformed", type(e).__name__) from None
    if not (isinstance(obj, list) and len(obj) == 4):
        raise Rejected("malformed", "not a 4-element envelope")
    version, type_id, msg_swarm, body = obj
    if version != VERSION or type(version) is not int:
        raise Rejected("bad_version", repr(version)[:40])
    codec = _BY_TYPE.get(type_id) if type(type_id) is int else None
    if codec is None:
        raise Rejected("unknown_type", repr(type_id)[:40])
    if msg_swarm != swarm:
        raise Rejected("wrong_swarm", repr(msg_swarm)[:40])
    if not isinstance(body, list):
        raise Rejected("malformed", "body is not an array")
    if len(data) > codec.max_bytes(ctx):
        raise Rejected("oversized", f"{len(data)} bytes for a {codec.cls.__name__}")
    return codec.from_body(body, ctx)


# --- field checks shared by message types -----------------------------------------------

def check_int(value: Any, lo: int, hi: int, name: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Rejected("bad_field", f"{name}={value!r}"[:80])
    return value


def check_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise Rejected("bad_field", f"{name}={value!r}"[:80])
    return value


def check_len(body: list, n: int, name: str) -> None:
    if len(body) != n:
        raise Rejected("malformed", f"{name} body has {len(body)} fields, expected {n}")


# --- SPSA records ---------------------------------------------------------------------------

def _record_from(body: list, ctx: Context) -> Record:
    check_len(body, 3, "record")
    return Record(check_int(body[0], 0, MAX_STEP, "step"), check_id(body[1], "peer"),
                  check_int(body[2], -Q_MAX, Q_MAX, "q"))


register(Codec(1, Record, lambda r: [r.step, r.peer, r.q], _record_from))


# --- tensor messages: NoLoCo shares, DiLoCo all-reduce parts -----------------------------

def _tensor_bound(ctx: Context, count: int) -> int:
    # fp32 with no compression is the largest any codec gets (top-k at fraction 1 adds
    # int32 indices: 8 bytes an element), plus headers and envelope.
    return 1024 + count * (tensors.HEADER.size + 8 * max(ctx.numel, 1))


def check_blob(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise Rejected("bad_field", f"{name} is not bytes")
    return value


def _share_from(body: list, ctx: Context) -> NoLoCoShare:
    check_len(body, 3, "noloco share")
    limit = _tensor_bound(ctx, 1)
    return NoLoCoShare(
        check_int(body[0], 0, MAX_STEP, "round"),
        tensors.decode_compressed(check_blob(body[1], "phi"), expected_numel=ctx.numel,
                                  max_bytes=limit),
        tensors.decode_compressed(check_blob(body[2], "update"), expected_numel=ctx.numel,
                                  max_bytes=limit))


def _part_numel(ctx: Context, part: int, n_parts: int) -> int:
    if n_parts > max(ctx.numel, 1):
        raise Rejected("bad_field", f"n_parts={n_parts} for {ctx.numel} elements")
    # part_bounds(numel, n_parts)[part] without building all n_parts of them: a 20-byte
    # message claiming 65535 parts made a 6 MB list here.
    base, extra = divmod(ctx.numel, n_parts)
    return base + (1 if part < extra else 0)


def _reduce_from(body: list, ctx: Context) -> ReducePart:
    check_len(body, 4, "reduce part")
    rnd = check_int(body[0], 0, MAX_STEP, "round")
    n_parts = check_int(body[2], 1, 1 << 16, "n_parts")
    part = check_int(body[1], 0, n_parts - 1, "part")
    numel = _part_numel(ctx, part, n_parts)
    return ReducePart(rnd, part, n_parts, tensors.decode_compressed(
        check_blob(body[3], "data"), expected_numel=numel, max_bytes=_tensor_bound(ctx, 1)))


def _gather_from(body: list, ctx: Context) -> GatherPart:
    check_len(body, 5, "gather part")
    rnd = check_int(body[0], 0, MAX_STEP, "round")
    n_parts = check_int(body[2], 1, 1 << 16, "n_parts")
    part = check_int(body[1], 0, n_parts - 1, "part")
    contributors = check_int(body[3], 1, 1 << 16, "contributors")
    numel = _part_numel(ctx, part, n_parts)
    return GatherPart(rnd, part, n_parts, contributors, tensors.decode_compressed(
        check_blob(body[4], "data"), expected_numel=numel, max_bytes=_tensor_bound(ctx, 1)))


register(Codec(2, NoLoCoShare,
               lambda m: [m.round, tensors.encode(m.phi), tensors.encode(m.update)],
               _share_from, lambda ctx: _tensor_bound(ctx, 2)))
register(Codec(3, ReducePart,
               lambda m: [m.round, m.part, m.n_parts, tensors.encode(m.data)],
               _reduce_from, lambda ctx: _tensor_bound(ctx, 1)))
register(Codec(4, GatherPart,
               lambda m: [m.round, m.part, m.n_parts, m.contributors, tensors.encode(m.data)],
               _gather_from, lambda ctx: _tensor_bound(ctx, 1)))
