"""Philox4x32-10 in plain torch, bit-identical to ``triton.language.randint(seed, offset)``.

Philox is the counter-based generator of Salmon et al., "Parallel Random Numbers: As Easy as
1, 2, 3" (SC'11): a word is a pure function of (key, counter), so any peer can regenerate
any slice of another peer's perturbation without generating what comes before it. That is
what makes seeded SPSA's "one byte per step" possible (DESIGN.md §3.1).

Triton's ``randint`` (triton/language/random.py, read for Triton 3.x) does, for an integer
seed and an int64 offset block:

- seed -> uint64 (so a negative seed is taken mod 2^64; a Python int is typed i32, i64 or
  u64 by its value, and each widens to the same 64 bits); key k0 = low 32 bits, k1 = high;
- counter c0 = low 32 bits of the offset, c1 = high 32 bits (0 for an int32 offset),
  c2 = c3 = 0;
- ten rounds, multipliers 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85;
- returns c0 of the final state, as int32.

We do the same in int64 with masks. A 32x32-bit product is below 2^64, and int64
multiplication wraps mod 2^64, so ``(a * b) >> 32 & M`` is the exact high word even when the
int64 result is "negative". The round function only uses ``* >> & ^ +``, so the same code
runs on Python ints (used for single words), on int64 tensors (the reference), and under
``torch.compile`` (the CPU fast path in ``kernels/rademacher.py``).
"""

from __future__ import annotations

from typing import TypeVar

import torch

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
N_ROUNDS = 10

# Python int or int64 tensor: the round function is written once for both.
T = TypeVar("T", int, torch.Tensor)


def seed_key(seed: int) -> tuple[int, int]:
    """(k0, k1): the low and high 32 bits of ``seed mod 2^64``, as Triton forms its key."""
    s = int(seed)
    if not -(1 << 63) <= s < (1 << 64):
        raise ValueError(f"seed {s} is outside [-2^63, 2^64)")
    s &= M64
    return s & M32, s >> 32


def seed_as_int64(seed: int) -> int:
    """The seed's 64 bits as a signed value, for storing in an int64 tensor (two's complement)."""
    k0, k1 = seed_key(seed)
    s = (k1 << 32) | k0
    return s - (1 << 64) if s >= (1 << 63) else s


def philox_rounds(c0: T, c1: T, k0: T, k1: T, n_rounds: int = N_ROUNDS) -> T:
    """First output word of Philox4x32 with counter (c0, c1, 0, 0) and key (k0, k1).

    All inputs hold unsigned 32-bit values (in [0, 2^32)); so does the result. Works on
    Python ints and on int64 tensors (which broadcast together).
    """
    c2 = c3 = 0
    for _ in range(n_rounds):
        p0 = ROUND_A * c0  # full 64-bit product (wraps harmlessly in int64)
        p2 = ROUND_B * c2
        c0, c1, c2, c3 = (
            ((p2 >> 32) & M32) ^ c1 ^ k0,
            p2 & M32,
            ((p0 >> 32) & M32) ^ c3 ^ k1,
            p0 & M32,
        )
        k0 = (k0 + KEY_A) & M32
        k1 = (k1 + KEY_B) & M32
    return c0


def philox_word_int(seed: int, offset: int) -> int:
    """One word as an unsigned Python int in [0, 2^32); cheap, for tails and tests."""
    k0, k1 = seed_key(seed)
    offset &= M64
    return philox_rounds(offset & M32, offset >> 32, k0, k1)


def philox_words(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)`` in eager torch: int32 words, same shape as ``offsets``.

    ``offsets`` is an integer tensor (int64 for counters beyond 2^32). The result's bits are
    what Triton returns; read it as unsigned with ``& 0xFFFFFFFF`` after ``.long()``.
    """
    k0, k1 = seed_key(seed)
    off = offsets.to(torch.int64)
    word = philox_rounds(off & M32, (off >> 32) & M32, k0, k1)  # (...,) int64 in [0, 2^32)
    # int64 -> int32 keeps the low 32 bits (two's complement), matching Triton's int32 view.
    return word.to(torch.int32)


def rademacher_bits(words: torch.Tensor) -> torch.Tensor:
    """(W,) int32 words -> (W, 32) bool: bit b of word w is element 32*w + b; True means +1."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool()
