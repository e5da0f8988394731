"""philox.py against Random123's known answer and against Triton's own tl.randint."""

import os

import pytest
import torch
from byteswarm.optim.philox import (
    philox_rounds,
    philox_word_int,
    philox_words,
    rademacher_bits,
    seed_as_int64,
    seed_key,
)

SEEDS = [0, 1, 12345, 2**31 - 1, 2**31 + 5, 2**32, 2**32 + 1, 2**63 - 1, 2**63 + 7, 2**64 - 1,
         -1, -5, -(2**31), -(2**31) - 1, -(2**40), -(2**63)]
# Counters straddling the 32-bit boundary, so c1 (the high word) is exercised; -1 is 2^64-1.
OFFSETS = [0, 1, 2, 31, 32, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3,
           2**62 + 9, 2**63 - 1, -1, -(2**40)]


def test_known_answer():
    # Random123 kat_vectors, philox4x32 10 rounds, counter 0 and key 0: first word.
    assert philox_rounds(0, 0, 0, 0) == 0x6627E8D5


def test_seed_is_taken_mod_2_64():
    assert seed_key(-1) == seed_key(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert seed_key(2**32 + 3) == (3, 1)
    assert seed_as_int64(2**64 - 1) == -1 and seed_as_int64(2**63) == -(2**63)
    offs = torch.arange(100)
    assert torch.equal(philox_words(-5, offs), philox_words(2**64 - 5, offs))
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            seed_key(bad)


def test_key_halves_both_matter():
    offs = torch.arange(64)
    w = {s: philox_words(s, offs) for s in (1, 2**32, 2**32 + 1)}
    assert not torch.equal(w[1], w[2**32]) and not torch.equal(w[1], w[2**32 + 1])


def test_scalar_and_tensor_paths_agree():
    offs = torch.tensor(OFFSETS, dtype=torch.int64)
    for seed in SEEDS:
        words = philox_words(seed, offs).long() & 0xFFFFFFFF
        assert words.tolist() == [philox_word_int(seed, o) for o in OFFSETS]


def test_bits_layout():
    words = torch.tensor([0b1011, -1, 0, -(2**31)], dtype=torch.int32)
    bits = rademacher_bits(words)  # (4, 32)
    assert bits[0, :5].tolist() == [True, True, False, True, False]
    assert bits[1].all() and not bits[2].any()
    assert bits[3].tolist() == [False] * 31 + [True]  # bit 31 is the sign bit


@pytest.fixture(scope="module")
def randint_kernels():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def by_value(out, offs, seed, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        tl.store(out + i, tl.randint(seed, tl.load(offs + i, mask=m)), mask=m)

    @triton.jit
    def by_pointer(out, offs, seed_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        seed = tl.load(seed_ptr)
        tl.store(out + i, tl.randint(seed, tl.load(offs + i, mask=m)), mask=m)

    return by_value, by_pointer


def _device():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("triton needs TRITON_INTERPRET=1 or a GPU")


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_triton_randint(randint_kernels, seed):
    by_value, by_pointer = randint_kernels
    dev = _device()
    offs = torch.tensor(OFFSETS, dtype=torch.int64, device=dev)
    want = philox_words(seed, offs.cpu())
    # Triton types a Python int seed by its value (i32 / i64 / u64) ...
    out = torch.empty(len(OFFSETS), dtype=torch.int32, device=dev)
    by_value[(1,)](out, offs, seed, len(OFFSETS), BLOCK=32)
    assert torch.equal(out.cpu(), want)
    # ... and our kernel loads it from an int64 tensor in two's complement.
    seed_t = torch.tensor([seed_as_int64(seed)], dtype=torch.int64, device=dev)
    out.zero_()
    by_pointer[(1,)](out, offs, seed_t, len(OFFSETS), BLOCK=32)
    assert torch.equal(out.cpu(), want)


def test_int32_offsets_match_int64(randint_kernels):
    # The Rademacher kernel uses int32 word offsets (high counter word 0).
    _, by_pointer = randint_kernels
    dev = _device()
    offs32 = torch.arange(0, 3000, 7, dtype=torch.int32, device=dev)
    out = torch.empty(offs32.numel(), dtype=torch.int32, device=dev)
    seed_t = torch.tensor([seed_as_int64(2**63 + 7)], device=dev)
    by_pointer[(1,)](out, offs32, seed_t, offs32.numel(), BLOCK=512)
    assert torch.equal(out.cpu(), philox_words(2**63 + 7, offs32.cpu().long()))
