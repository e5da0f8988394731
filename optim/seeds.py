"""Seeds derived by hashing, so every peer computes the same seed from the same names."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 64-bit unsigned seed from blake2b over the parts' text forms.

    Parts are joined with a separator that cannot appear in ``repr`` of ints/strs, so
    ``("a", 1)`` and ``("a1",)`` differ.
    """
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
