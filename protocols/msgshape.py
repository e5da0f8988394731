"""A msgpack value's shape, checked from its headers before anything is decoded.

msgpack's own length limits bound each container, not how deep containers nest nor how
many items they claim in all, and ``unpackb`` allocates what a header claims before it
looks further: 10 KB of nested array headers cost megabytes, and a walk over 1,000
nested arrays overflows Python's stack. ``check_shape`` reads headers only, with a loop,
so a decoder can refuse such input in time and memory that grow with its bytes alone.
"""

from __future__ import annotations

from typing import Any

from byteswarm.optim.sansio import Rejected

MAX_INT = (1 << 63) - 1  # what 64 bits (and TOML) can hold

# msgpack headers by first byte (fixints, fixmaps, fixarrays and fixstrs are ranges, below).
SCALAR = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
           0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8,
           0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}  # bytes after the type byte
SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xd9: (1, 0), 0xda: (2, 0),
          0xdb: (4, 0), 0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1)}  # (length bytes, type bytes)
# (count bytes, values per counted item: a map's entry is a key and a value)
CONTAINER = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}


def check_shape(blob: bytes, max_depth: int, reason: str) -> None:
    """Rejected(reason) unless ``blob`` is exactly one msgpack value, nested at most
    ``max_depth`` containers deep, each container claiming no more items than there are
    bytes left for them (every item takes at least one). Reads headers only and allocates
    nothing that grows with the input, so it can run before msgpack builds anything."""
    n, i = len(blob), 0
    todo = [1]  # values still to read at each open level; the outermost holds one value
    while todo:
        if todo[-1] == 0:
            todo.pop()
            continue
        todo[-1] -= 1
        if i >= n:
            raise Rejected(reason, "truncated msgpack")
        b, i = blob[i], i + 1
        if b <= 0x7f or b >= 0xe0:  # fixint
            continue
        if 0xa0 <= b <= 0xbf:  # fixstr
            i += b & 0x1f
            continue
        if b in SCALAR:
            i += SCALAR[b]
            continue
        if b in SIZED:
            width, ext = SIZED[b]
            i += width + ext + int.from_bytes(blob[i:i + width], "big")
            continue
        if b <= 0x9f:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            count, per = b & 0x0f, 2 if b <= 0x8f else 1
        elif b in CONTAINER:
            width, per = CONTAINER[b]
            count, i = int.from_bytes(blob[i:i + width], "big"), i + width
        else:
            raise Rejected(reason, f"byte 0x{b:02x} starts no msgpack value")
        if len(todo) > max_depth:
            raise Rejected(reason, f"containers nested more than {max_depth} deep")
        if i > n or count * per > n - i:
            raise Rejected(reason, f"a container claims {count} items, but only "
                           f"{max(n - i, 0)} bytes follow")
        todo.append(count * per)
    if i > n:
        raise Rejected(reason, "truncated msgpack")
    if i < n:
        raise Rejected(reason, f"{n - i} bytes after the value")


def check_ints(obj: Any) -> None:
    """``Rejected("bad_manifest")`` unless every integer in a decoded ``obj`` fits in 64
    bits (a loop: ``check_shape`` bounded the depth, but a walk should not rely on that
    to stay off the stack)."""
    todo = [obj]
    while todo:
        obj = todo.pop()
        if isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, list):
            todo.extend(obj)
        elif type(obj) is int and not -MAX_INT - 1 <= obj <= MAX_INT:
            raise Rejected("bad_manifest", f"integer {obj} does not fit in 64 bits")
