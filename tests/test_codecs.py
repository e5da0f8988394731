"""Codecs (optim/codecs.py) and their wire bytes (protocols/tensors.py)."""

import math
import struct

import pytest
import torch
import torch._dynamo
from byteswarm.optim.codecs import (
    CODECS,
    TopK,
    decompress,
    dequantize_int8,
    dequantize_int8_reference,
    make_codec,
    quantize_int8,
    quantize_int8_reference,
)
from byteswarm.optim.sansio import Rejected
from byteswarm.protocols.tensors import HEADER, decode, decode_compressed, encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def randn(n, seed=0, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


# --- math --------------------------------------------------------------------------------

def test_lossless_and_half_codecs_stay_within_their_rounding():
    x = randn(3000, 1, 5.0)
    assert torch.equal(make_codec("none").decompress(make_codec("none").compress(x)), x)
    for name, rel in [("fp16", 2**-11), ("bf16", 2**-8)]:
        codec = make_codec(name)
        y = codec.decompress(codec.compress(x))
        assert bool(((y - x).abs() <= rel * x.abs()).all())
        assert not torch.equal(y, x)


@pytest.mark.parametrize("n,block", [(3000, 256), (256 * 4, 256), (1001, 64), (5, 8)])
def test_int8_error_is_at_most_half_a_step(n, block):
    x = randn(n, 2, 3.0)
    x[: min(n, block)] = 0.0  # an all-zero block must come back as zeros
    codec = make_codec("int8", block=block)
    c = codec.compress(x)
    assert c.values.dtype == torch.int8 and c.scales.numel() == math.ceil(n / block)
    y = codec.decompress(c)
    step = c.scales.repeat_interleave(block)[:n]  # (N,) scale of each element's block
    assert bool(((y - x).abs() <= step / 2 * (1 + 1e-6) + 1e-7 * x.abs()).all())
    assert bool((y[: min(n, block)] == 0).all())
    assert c.nbytes == n + 4 * math.ceil(n / block)


@pytest.mark.parametrize("impl", ["compiled", "triton"])
def test_fused_int8_kernels_are_bit_exact(impl):
    for n, block, seed in [(5000, 256, 3), (2048, 256, 4), (777, 64, 5)]:
        x = randn(n, seed, 2.0)
        x[100:300] = 0.0
        x[7] = 1e-30  # tiny values, halfway cases are covered by the volume
        q, s = quantize_int8_reference(x, block)
        q2, s2 = quantize_int8(x, block, impl=impl)
        assert torch.equal(q, q2) and torch.equal(s, s2)
        assert torch.equal(dequantize_int8(q, s, block, impl=impl),
                           dequantize_int8_reference(q, s, block))


def test_compiled_int8_does_not_recompile_for_new_sizes():
    q, s = quantize_int8(randn(3000), 256, impl="compiled")
    dequantize_int8(q, s, 256, impl="compiled")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (4096, 12345, 999):
            q, s = quantize_int8(randn(n, n), 256, impl="compiled")
            dequantize_int8(q, s, 256, impl="compiled")


def test_topk_keeps_the_largest_entries():
    x = randn(1000, 6)
    c = TopK(0.05).compress(x)
    assert c.values.numel() == 50 and c.indices.dtype == torch.int32
    y = decompress(c)
    assert set(torch.nonzero(y).flatten().tolist()) == set(x.abs().topk(50).indices.tolist())
    assert torch.equal(y[c.indices.long()], x[c.indices.long()])


def test_error_feedback_keeps_the_accumulated_error_bounded():
    n, rounds = 2000, 100
    ef, plain = TopK(0.05), TopK(0.05, error_feedback=False)
    sent_ef, sent_plain, total = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=g)  # a persistent direction, as in real updates
    for _ in range(rounds):
        x = bias + torch.randn(n, generator=g)
        x /= x.norm()  # max ‖x‖ = 1
        total += x
        sent_ef += decompress(ef.compress(x))
        sent_plain += decompress(plain.compress(x))
        assert float(ef.residual.norm()) <= ef.bound(1.0, n)
        # Everything sent plus what is still held is everything that came in.
        torch.testing.assert_close(sent_ef + ef.residual, total, rtol=0, atol=1e-4)
    err_ef = float((sent_ef - total).norm())
    err_plain = float((sent_plain - total).norm())
    assert err_ef < 0.2 * err_plain  # without feedback the dropped mass piles up
    assert err_ef <= ef.bound(1.0, n)


def test_topk_refuses_a_stream_that_changes_size():
    t = TopK(0.1)
    t.compress(randn(100))
    with pytest.raises(ValueError):
        t.compress(randn(50))


# --- wire bytes --------------------------------------------------------------------------

def compressed(name, n=1000, seed=8):
    return make_codec(name).compress(randn(n, seed))


@pytest.mark.parametrize("name", list(CODECS))
def test_encode_decode_round_trip(name):
    c = compressed(name)
    data = encode(c, name)
    y = decode(data, expected_numel=1000, max_bytes=len(data))
    assert torch.equal(y, decompress(c))
    back = decode_compressed(data, expected_numel=1000, max_bytes=1 << 20)
    assert back.codec == name and back.nbytes == c.nbytes
    assert len(data) == HEADER.size + c.nbytes


def reason(data, n=1000, max_bytes=1 << 20):
    with pytest.raises(Rejected) as e:
        decode(data, expected_numel=n, max_bytes=max_bytes)
    return e.value.reason


def patched(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_decode_rejects_bad_payloads_with_stable_reasons():
    good = encode(compressed("none"))
    assert reason(good[:10]) == "truncated"
    assert reason(good[:-4]) == "truncated"
    assert reason(good + b"\0\0\0\0") == "trailing_bytes"
    assert reason(good, max_bytes=len(good) - 1) == "oversized"
    assert reason(good, n=999) == "wrong_size"
    assert reason(patched(good, 0, "<B", 2)) == "bad_version"
    assert reason(patched(good, 1, "<B", 9)) == "bad_codec"
    assert reason(patched(good, 2, "<B", 3)) == "bad_dtype"
    assert reason(patched(good, 3, "<B", 1)) == "malformed"
    assert reason(patched(good, HEADER.size + 8, "<f", math.nan)) == "non_finite"
    assert reason(patched(good, HEADER.size, "<f", math.inf)) == "non_finite"
    assert reason("not bytes") == "malformed"
    # A header that promises more than max_bytes is refused before anything is read.
    huge = patched(patched(good, 8, "<Q", 10**12), 0, "<B", 1)
    assert reason(huge, n=10**12) == "oversized"


def test_decode_rejects_bad_int8_and_topk_fields():
    q8 = encode(compressed("int8"))
    n_scales = math.ceil(1000 / 256)
    scales_at = HEADER.size + 1000
    assert reason(patched(q8, scales_at, "<f", math.nan)) == "non_finite"
    assert reason(patched(q8, scales_at, "<f", -1.0)) == "bad_field"
    assert reason(patched(q8, scales_at, "<f", 3e38)) == "non_finite"
    assert reason(patched(q8, HEADER.size, "<b", -128)) == "bad_field"
    assert reason(patched(q8, 4, "<I", 100)) == "bad_field"  # block not a power of two
    assert len(q8) == scales_at + 4 * n_scales

    tk = encode(compressed("topk"))  # k = 10 fp32 values, then 10 int32 indices
    idx_at = HEADER.size + 40
    assert reason(patched(tk, idx_at, "<i", 1000)) == "bad_index"
    assert reason(patched(tk, idx_at, "<i", -1)) == "bad_index"
    first = struct.unpack_from("<i", tk, idx_at)[0]
    assert reason(patched(tk, idx_at + 4, "<i", first)) == "duplicate_index"
    assert reason(patched(tk, 4, "<I", 1001)) == "bad_field"  # k > N
    assert reason(patched(tk, HEADER.size, "<f", math.inf)) == "non_finite"


VALID = [encode(compressed(name, 64, seed=9)) for name in CODECS]


def decode_only_rejects(data, n=64):
    try:
        y = decode(data, expected_numel=n, max_bytes=4096)
    except Rejected as e:
        assert e.reason and isinstance(e.reason, str)
        return
    assert y.shape == (n,) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_rejected(data):
    decode_only_rejects(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)),
                                        max_size=6), st.integers(-40, 40))
def test_mutated_payloads_only_ever_raise_rejected(data, flips, resize):
    b = bytearray(data)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    b = b[:resize] if resize < 0 else b + bytes(resize)
    decode_only_rejects(bytes(b))
