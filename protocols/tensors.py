"""Compressed tensors to versioned bytes and back, validated before use.

Layout (little-endian), a 16-byte header then the payload:

    offset  size  field
    0       1     version (= 1)
    1       1     codec id: 0 none, 1 fp16, 2 bf16, 3 int8, 4 topk
    2       1     value dtype id: 0 fp32, 1 fp16, 2 bf16, 3 int8
    3       1     reserved, 0
    4       4     aux: int8 -> block size; topk -> k; else 0
    8       8     numel N of the original flat vector
    16      ...   values (N elements, or k for topk), then int8: ceil(N/block) fp32
                  scales; topk: k int32 indices (ascending)

``decode`` checks, in this order, and raises ``Rejected(reason)`` at the first problem:
type and size (``malformed``, ``oversized``, ``truncated``), ``bad_version``, ``bad_codec``,
``bad_dtype`` (the codec's allowed value dtype), ``malformed`` (reserved byte),
``wrong_size`` (N must be the receiver's own vector length), ``bad_field`` (block or k out
of range), then the payload length implied by the header — computed in Python integers,
compared with ``max_bytes`` (``oversized``) and with the bytes present (``truncated``,
``trailing_bytes``) — before any tensor is made. Only then are tensors read, and checked:
``non_finite`` (NaN/Inf values or scales, or scales so large that q·s overflows),
``bad_field`` (negative scales, the int8 code −128 that the symmetric codec never makes),
``bad_index`` (a top-k index outside [0, N)), ``duplicate_index``.
"""

from __future__ import annotations

import math
import struct
import sys

import torch
from byteswarm.optim.codecs import MAX_BLOCK, MIN_BLOCK, Compressed, decompress
from byteswarm.optim.sansio import Rejected

VERSION = 1
HEADER = struct.Struct("<BBBBIQ")

CODEC_IDS = {"none": 0, "fp16": 1, "bf16": 2, "int8": 3, "topk": 4}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
DTYPES = {v: k for k, v in DTYPE_IDS.items()}
# The value dtypes each codec may carry.
ALLOWED = {"none": {0}, "fp16": {1}, "bf16": {2}, "int8": {3}, "topk": {0, 1, 2}}
FP32_MAX = torch.finfo(torch.float32).max

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("byteswarm's tensor wire format assumes a little-endian machine")


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode(c: Compressed, codec: str | None = None) -> bytes:
    """Bytes for ``c``; ``codec`` (the registry name), if given, must be c's codec."""
    if codec is not None and codec != c.codec:
        raise ValueError(f"encode: compressed with {c.codec!r}, asked to encode as {codec!r}")
    cid = CODEC_IDS[c.codec]  # KeyError: our bug (an unregistered codec)
    aux = c.block if c.codec == "int8" else c.values.numel() if c.codec == "topk" else 0
    parts = [HEADER.pack(VERSION, cid, DTYPE_IDS[c.values.dtype], 0, aux, c.numel),
             _bytes(c.values)]
    if c.codec == "int8":
        parts.append(_bytes(c.scales.float()))
    elif c.codec == "topk":
        parts.append(_bytes(c.indices.to(torch.int32)))
    return b"".join(parts)


def _payload_size(codec: str, dtype: torch.dtype, aux: int, numel: int) -> int:
    """Bytes after the header that the header promises (Python ints: no overflow)."""
    item = torch.empty(0, dtype=dtype).element_size()
    if codec == "int8":
        return numel + 4 * -(-numel // aux)
    if codec == "topk":
        return aux * (item + 4)
    return numel * item


def _tensor(data: bytes | bytearray | memoryview, start: int, count: int,
            dtype: torch.dtype) -> torch.Tensor:
    item = torch.empty(0, dtype=dtype).element_size()
    if count == 0:
        return torch.empty(0, dtype=dtype)
    # One copy into memory we own (the caller's buffer may be reused or read-only).
    return torch.frombuffer(bytearray(memoryview(data)[start:start + count * item]),
                            dtype=dtype)


def decode_compressed(data: bytes, *, expected_numel: int, max_bytes: int) -> Compressed:
    """Validated Compressed from bytes (see the module docstring for the checks)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected("malformed", "not bytes")
    if isinstance(data, memoryview) and (data.format != "B" or not data.c_contiguous):
        raise Rejected("malformed", "not a contiguous byte buffer")
    if len(data) > max_bytes:
        raise Rejected("oversized", f"{len(data)} > {max_bytes} bytes")
    if len(data) < HEADER.size:
        raise Rejected("truncated", f"{len(data)} bytes, header needs {HEADER.size}")
    version, cid, did, reserved, aux, numel = HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise Rejected("bad_version", str(version))
    codec = CODEC_NAMES.get(cid)
    if codec is None:
        raise Rejected("bad_codec", str(cid))
    if did not in ALLOWED[codec]:
        raise Rejected("bad_dtype", f"{codec} with dtype id {did}")
    if reserved != 0:
        raise Rejected("malformed", "reserved byte set")
    if numel != expected_numel:
        raise Rejected("wrong_size", f"{numel} elements, expected {expected_numel}")
    if codec == "int8" and not (MIN_BLOCK <= aux <= MAX_BLOCK and aux & (aux - 1) == 0):
        raise Rejected("bad_field", f"int8 block {aux}")
    if codec == "topk" and aux > numel:
        raise Rejected("bad_field", f"k = {aux} > N = {numel}")
    if codec not in ("int8", "topk") and aux != 0:
        raise Rejected("bad_field", f"aux {aux} for {codec}")
    dtype = DTYPES[did]
    want = HEADER.size + _payload_size(codec, dtype, aux, numel)
    if want > max_bytes:
        raise Rejected("oversized", f"header promises {want} > {max_bytes} bytes")
    if len(data) < want:
        raise Rejected("truncated", f"{len(data)} bytes, header promises {want}")
    if len(data) > want:
        raise Rejected("trailing_bytes", f"{len(data)} bytes, header promises {want}")

    off = HEADER.size
    count = aux if codec == "topk" else numel
    values = _tensor(data, off, count, dtype)
    off += values.numel() * values.element_size()
    if codec == "int8":
        scales = _tensor(data, off, -(-numel // aux), torch.float32)
        if not bool(torch.isfinite(scales).all()):
            raise Rejected("non_finite", "int8 scale")
        if bool((scales < 0).any()):
            raise Rejected("bad_field", "negative int8 scale")
        if bool((scales > FP32_MAX / 127).any()):
            raise Rejected("non_finite", "int8 scale overflows on dequantisation")
        if bool((values == -128).any()):
            raise Rejected("bad_field", "int8 code -128")
        return Compressed(codec, numel, values, scales=scales, block=aux)
    if not bool(torch.isfinite(values).all()):
        raise Rejected("non_finite", f"{codec} values")
    if codec == "topk":
        indices = _tensor(data, off, aux, torch.int32)
        if aux and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise Rejected("bad_index", "top-k index outside the vector")
        if aux > 1 and bool((indices[1:] <= indices[:-1]).any()):
            # The encoder writes ascending indices, so any repeat or disorder is junk.
            raise Rejected("duplicate_index", "top-k indices not strictly ascending")
        return Compressed(codec, numel, values, indices=indices)
    return Compressed(codec, numel, values)


def decode(data: bytes, *, expected_numel: int, max_bytes: int) -> torch.Tensor:
    """Bytes to the decompressed flat fp32 vector, or Rejected(reason)."""
    return decompress(decode_compressed(data, expected_numel=expected_numel,
                                        max_bytes=max_bytes))


def max_encoded_size(codec: str, numel: int, *, block: int = MIN_BLOCK,
                     topk_fraction: float = 1.0) -> int:
    """An upper bound on ``encode``'s output for a vector of ``numel`` (for max_bytes)."""
    if codec == "int8":
        return HEADER.size + _payload_size("int8", torch.int8, block, numel)
    if codec == "topk":
        k = min(numel, math.ceil(topk_fraction * numel))
        return HEADER.size + _payload_size("topk", torch.float32, k, numel)
    dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
    return HEADER.size + _payload_size(codec, dtype, 0, numel)
