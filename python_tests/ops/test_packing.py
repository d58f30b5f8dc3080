"""Packed integer codes: pack / unpack, quantize_pack / unpack_dequantize.

Golden bytes pin the layout (docs/DESIGN.md section 3); round trips, float64 references
(reference.py), agreement with fake_quant, the stochastic-rounding contract (unbiased,
reproducible from the generator, independent of the thread count), every error, and
torch.library.opcheck on every op."""

from __future__ import annotations

import math

import pytest
import torch

import helpers as h
import reference as ref
from conftest import requires_cuda, supported_capabilities
from oqfl_ext import ops as oq

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (3, 5, 7)  # 105 elements: an odd int4 tail


def _range(bits, signed=True):
    return h.bit_range(bits, signed)


def _codes(shape, bits, signed, device):
    lo, hi = _range(bits, signed)
    return torch.randint(lo, hi + 1, shape).to(torch.int8 if signed else torch.uint8).to(device)


def _params(shape, axis, with_zp, bits, device, pow2=True):
    pshape = () if axis is None else (shape[axis],)
    qmin, qmax = _range(bits)
    s = h.pow2_scale(pshape, device) if pow2 else (torch.rand(pshape) * 0.2 + 0.01).to(device)
    z = h.int_zero_point(pshape, qmin // 2, qmax // 2, device) if with_zp else None
    return s, z


# ------------------------------------------------------------------ golden bytes

GOLDEN = [
    (4, torch.int8, [1, -2, 7, -8, 3], [0xE1, 0x87, 0x03]),
    (4, torch.int8, [-1, 0, -8, 7], [0x0F, 0x78]),
    (4, torch.uint8, [0, 15, 10], [0xF0, 0x0A]),
    (8, torch.int8, [-1, 0, 127, -128, 5], [0xFF, 0x00, 0x7F, 0x80, 0x05]),
    (8, torch.uint8, [255, 0, 128], [0xFF, 0x00, 0x80]),
]


@pytest.mark.parametrize("bits,dtype,codes,expected", GOLDEN)
def test_golden_bytes(plain_device, bits, dtype, codes, expected):
    q = torch.tensor(codes, dtype=dtype, device=plain_device)
    packed = oq.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.device == q.device
    assert packed.cpu().tolist() == expected
    back = oq.unpack(packed, bits, len(codes), signed=dtype == torch.int8)
    assert back.dtype == dtype and back.cpu().tolist() == codes


def test_golden_quantize_pack():
    # v = x / 0.5 = [1, -2, 7.4, -9, 2.5]: codes [1, -2, 7, -8 (clamped), 2 (tie to even)]
    x = torch.tensor([0.5, -1.0, 3.7, -4.5, 1.25])
    packed = oq.quantize_pack(x, torch.tensor(0.5), bits=4)
    assert packed.tolist() == [0xE1, 0x87, 0x02]


# ------------------------------------------------------------------ pack / unpack

@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 33333, 40001])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip(plain_device, bits, signed, n):
    q = _codes((n,), bits, signed, plain_device)
    packed = oq.pack(q, bits)
    assert packed.shape == (math.ceil(n * bits / 8),)
    assert torch.equal(packed.cpu(), ref.pack_ref(q.cpu(), bits))
    assert torch.equal(oq.unpack(packed, bits, n, signed=signed), q)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_row_major_of_any_layout(plain_device, bits):
    q = _codes((6, 9), bits, True, plain_device).t()  # non-contiguous
    assert torch.equal(oq.pack(q, bits), oq.pack(q.contiguous(), bits))
    assert torch.equal(oq.unpack(oq.pack(q, bits), bits, q.numel()).view(9, 6), q)


def test_unpack_non_contiguous_packed(plain_device):
    q = _codes((10,), 4, True, plain_device)
    spread = torch.zeros(10, dtype=torch.uint8, device=plain_device)
    spread[::2] = oq.pack(q, 4)
    assert torch.equal(oq.unpack(spread[::2], 4, 10), q)


def test_unpack_unsigned_reads_nibbles(plain_device):
    packed = torch.tensor([0xE1, 0x87], dtype=torch.uint8, device=plain_device)
    assert oq.unpack(packed, 4, 4, signed=False).tolist() == [1, 14, 7, 8]
    assert oq.unpack(packed, 8, 2, signed=True).tolist() == [-31, -121]


# ------------------------------------------------------------------ quantize_pack

@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_pack_vs_reference(plain_device, bits, dtype, axis, with_zp):
    s, z = _params(SHAPE, axis, with_zp, bits, plain_device)
    qmin, qmax = _range(bits)
    # on a 1/8 grid of v with ties and clamped values; power-of-two scales make it exact
    x = h.dyadic_x(SHAPE, s, z, qmin, qmax, dtype, plain_device, axis=axis)
    packed = oq.quantize_pack(x, s, z, bits=bits, axis=axis)
    codes = ref.quantize_codes_ref(x, s, z, bits=bits, axis=axis)
    assert torch.equal(packed.cpu(), ref.pack_ref(codes.cpu(), bits))
    # and the inverse, exactly (q - z) * s
    y = oq.unpack_dequantize(packed, s, z, bits=bits, shape=SHAPE, axis=axis)
    y_ref = (codes.to(torch.float64) - ref.param_view(z, x, axis)) * ref.param_view(s, x, axis)
    assert y.dtype == torch.float32 and y.shape == SHAPE
    torch.testing.assert_close(y.to(torch.float64), y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 2, -1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_equals_fake_quant(device, bits, dtype, axis, with_zp):
    # arbitrary (not power-of-two) scales and normal x: the same float32 arithmetic as fake_quant
    shape = (4, 6, 33)
    s, z = _params(shape, axis, with_zp, bits, device, pow2=False)
    x = (torch.randn(shape) * 0.6).to(dtype).to(device)
    qmin, qmax = _range(bits)
    packed = oq.quantize_pack(x, s, z, bits=bits, axis=axis)
    y = oq.unpack_dequantize(packed, s, z, bits=bits, shape=shape, axis=axis)
    want = oq.fake_quant(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    # fake_quant rounds (q - z) * s to x's dtype; compare in that dtype
    torch.testing.assert_close(y.to(dtype), want, rtol=0, atol=0)


def test_quantize_pack_non_contiguous(plain_device):
    x = torch.randn(8, 5, 6, device=plain_device).transpose(0, 2)  # shape (6, 5, 8)
    s = torch.rand(5, device=plain_device) + 0.1
    got = oq.quantize_pack(x, s, bits=4, axis=1)
    assert torch.equal(got, oq.quantize_pack(x.contiguous(), s, bits=4, axis=1))


def test_quantize_pack_nan_and_inf(plain_device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=plain_device)
    codes = oq.unpack(oq.quantize_pack(x, torch.tensor(1.0, device=plain_device), bits=4), 4, 4)
    assert codes.tolist() == [0, 7, -8, 1]


@pytest.mark.parametrize("bits", [4, 8])
def test_empty(plain_device, bits):
    for shape, axis in (((0,), None), ((0, 3), 1), ((2, 0, 4), 0)):
        x = torch.empty(shape, device=plain_device)
        s = torch.ones(() if axis is None else (shape[axis],), device=plain_device)
        packed = oq.quantize_pack(x, s, bits=bits, axis=axis)
        assert packed.shape == (0,) and packed.dtype == torch.uint8
        y = oq.unpack_dequantize(packed, s, bits=bits, shape=shape, axis=axis)
        assert y.shape == shape and y.dtype == torch.float32
    assert oq.pack(torch.empty(0, 5, dtype=torch.int8, device=plain_device), bits).shape == (0,)
    assert oq.unpack(torch.empty(0, dtype=torch.uint8, device=plain_device), bits, 0).shape == (0,)


# ------------------------------------------------------------------ stochastic rounding

def _stochastic(x, s, z=None, *, bits=8, axis=None, seed=0, gen_device="cpu"):
    g = torch.Generator(device=gen_device).manual_seed(seed)
    return oq.quantize_pack(x, s, z, bits=bits, axis=axis, stochastic=True, generator=g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [None, 1])
def test_stochastic_matches_counter_reference(bits, axis):
    # the documented scheme, written out in Python: seed drawn like torch.randint, then a
    # counter hash of (seed, element index)
    shape = (7, 9)
    s, z = _params(shape, axis, True, bits, "cpu", pow2=False)
    x = torch.randn(shape) * 0.5
    packed = _stochastic(x, s, z, bits=bits, axis=axis, seed=1234)
    seed = int(torch.randint(2 ** 63 - 1, (1,), generator=torch.Generator().manual_seed(1234)))
    u = ref.counter_uniform_ref(seed, x.numel()).view(shape)
    # the kernel's v is float32; take the same v (x / s + z in float32) for the reference
    v32 = x / ref.param_view(s, x, axis).float() + ref.param_view(z, x, axis).float()
    codes = ref.quantize_codes_ref(v32, torch.tensor(1.0), None, bits=bits, u=u)
    assert torch.equal(packed, ref.pack_ref(codes, bits))


def test_stochastic_unbiased_one_call():
    # n equal values per fraction: each code is floor(v) + Bernoulli(frac), so the mean code of
    # the n draws has standard deviation sqrt(f (1 - f) / n) <= 0.5 / sqrt(n) = 0.0016 for
    # n = 1e5. A bound of 0.01 is > 6 sigma (false failure < 1e-9 per value), while
    # round-half-to-even is off by min(f, 1 - f) >= 0.125 for every fraction tested.
    n = 100_000
    fractions = torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875])  # exact in float32
    v = (torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0]) + fractions).repeat_interleave(n)
    s = torch.tensor(0.25)
    x = v * s  # exact: power-of-two scale
    y = oq.unpack_dequantize(_stochastic(x, s, bits=4, seed=7), s, bits=4, shape=x.shape)
    mean_code = (y / s).view(5, n).mean(dim=1, dtype=torch.float64)
    assert (mean_code - v.view(5, n)[:, 0].double()).abs().max() < 0.01
    nearest = torch.round(v.view(5, n)[:, 0])
    assert ((nearest - v.view(5, n)[:, 0]).abs() >= 0.125).all()


def test_stochastic_unbiased_across_draws():
    # one generator, many calls: each element's mean over k draws is within 6 sigma
    # (sigma <= s / (2 sqrt(k))) of x. 64 elements x P(|N(0,1)| > 6) ~ 1e-7 false failures.
    k = 1024
    s = torch.tensor(0.1)
    x = torch.rand(64) * 2 - 1  # well inside [-12.8, 12.7] * s: no clamping
    g = torch.Generator().manual_seed(99)
    ys = torch.stack([oq.unpack_dequantize(
        oq.quantize_pack(x, s, bits=8, stochastic=True, generator=g), s, bits=8, shape=x.shape)
        for _ in range(k)])
    sigma = 0.1 / (2 * math.sqrt(k))
    assert (ys.double().mean(0) - x.double()).abs().max() < 6 * sigma
    # every draw is one of the two neighbours of x / s
    v = (x / s).double()
    codes = (ys / s).round().double()
    assert ((codes == v.floor()) | (codes == v.floor() + 1)).all()


def test_stochastic_reproducible_and_seeded():
    x = torch.randn(4096)
    s = torch.tensor(0.05)
    a = _stochastic(x, s, seed=5)
    assert torch.equal(a, _stochastic(x, s, seed=5))
    assert not torch.equal(a, _stochastic(x, s, seed=6))
    # the generator advances: a second call with the same generator draws a new seed
    g = torch.Generator().manual_seed(5)
    first = oq.quantize_pack(x, s, bits=8, stochastic=True, generator=g)
    second = oq.quantize_pack(x, s, bits=8, stochastic=True, generator=g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    # no generator: the default one, so torch.manual_seed reproduces it
    torch.manual_seed(11)
    b = oq.quantize_pack(x, s, bits=8, stochastic=True)
    torch.manual_seed(11)
    assert torch.equal(b, oq.quantize_pack(x, s, bits=8, stochastic=True))
    # deterministic rounding does not touch the generator
    state = g.get_state()
    oq.quantize_pack(x, s, bits=8, generator=g)
    assert torch.equal(state, g.get_state())


@pytest.mark.parametrize("axis", [None, 0])
def test_stochastic_independent_of_threads(restore_threads, axis):
    # large enough for many chunks of the CPU kernel
    x = torch.randn(64, 4001)
    s = torch.rand(64) + 0.05 if axis == 0 else torch.tensor(0.3)
    out = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out.append(_stochastic(x, s, bits=4, axis=axis, seed=3))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])



def test_counter_uniform_reference_known_answers():
    # the values csrc/tests/test_quant_math.cpp pins for the C++ counter_uniform (seed 42), so
    # the Python reference the kernels are tested against is the header's formula; across the
    # 2^32 boundary the index's high half changes the key
    u = ref.counter_uniform_ref(42, 4) * 2 ** 24
    assert u[0] == 7713660 and u[3] == 7925663
    u = ref.counter_uniform_ref(42, 5, start=2 ** 32 - 2) * 2 ** 24
    assert u[0] == 5170073 and u[4] == 16032029


def test_stochastic_matches_counter_reference_many_chunks(restore_threads):
    # a tensor of many kernel chunks on 2 threads: every element's uniform is the reference's
    torch.set_num_threads(2)
    x = torch.randn(3, 100_003) * 0.3
    s = torch.tensor(0.01)
    packed = _stochastic(x, s, bits=8, seed=77)
    seed = int(torch.randint(2 ** 63 - 1, (1,), generator=torch.Generator().manual_seed(77)))
    u = ref.counter_uniform_ref(seed, x.numel()).view(x.shape)
    codes = ref.quantize_codes_ref(x / s, torch.tensor(1.0), None, bits=8, u=u)
    assert torch.equal(packed, ref.pack_ref(codes, 8))


def _chi2_z(stat: float, dof: int) -> float:
    """A chi-square statistic as a standard normal deviate (Wilson-Hilferty)."""
    c = 2.0 / (9 * dof)
    return ((stat / dof) ** (1 / 3) - (1 - c)) / math.sqrt(c)


def _histogram_chi2_z(u, bins):
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    expected = u.numel() / bins
    return _chi2_z(float(((counts - expected) ** 2 / expected).sum()), bins - 1)


def _pairs_chi2_z(a, b, bins=16):
    """Independence of two uniform streams: chi-square of their joint bins x bins histogram
    against the uniform one (catches dependence a correlation misses)."""
    return _histogram_chi2_z(((a * bins).floor() * bins + (b * bins).floor()) / bins ** 2,
                             bins * bins)


def _corr(a, b):
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2 ** 62 + 12345])
def test_counter_uniforms_statistics(seed):
    # Against independent expectations, n = 2^20 uniforms of the reference (the kernels give
    # its bits: the tests above): each bound is 5 standard deviations (a correlation of
    # independent streams has sd 1 / sqrt(n); chi-square statistics as normal deviates), so a
    # sound generator fails with probability ~1e-7 per check, while a plain counter (a Weyl
    # sequence: histogram z = -32, pairs z = 1200) or a 32-bit LCG (pairs z = 1200) fail by far,
    # and a stream repeated across seeds or blocks fails the equality check.
    n = 2 ** 20
    bound = 5 / math.sqrt(n)
    u = ref.counter_uniform_ref(seed, n + 64)
    a = u[:n]
    assert ((u >= 0) & (u < 1)).all()
    assert abs(float(a.mean()) - 0.5) < 5 / math.sqrt(12 * n)
    assert abs(_histogram_chi2_z(a, 256)) < 5  # too even is no more random than too uneven
    for lag in (1, 2, 3, 8, 64):  # neighbouring indices
        b = u[lag:lag + n]
        assert abs(_corr(a, b)) < bound, lag
        assert _pairs_chi2_z(a, b) < 5, lag
    # neighbouring seeds, and the next block of 2^32 indices of the same seed
    for other in (ref.counter_uniform_ref(seed + 1, n), ref.counter_uniform_ref(seed, n, start=2 ** 32)):
        assert abs(_corr(a, other)) < bound
        assert _pairs_chi2_z(a, other) < 5
        assert (a == other).double().mean() < 1e-4  # equal by chance: 2^-24 each


def test_stochastic_rounding_distribution():
    # The kernel's rounding against float64 expectations: 63 fractions j / 64 interleaved along
    # the tensor (neighbouring elements, different fractions), 2^14 elements each. Element i
    # rounds up with probability frac_i (u < frac), so the up counts per fraction are binomial:
    # their chi-square (63 dof) and the mean code against the float64 mean of v within 5 sigma.
    k, per = 63, 2 ** 14
    frac = torch.arange(1, k + 1, dtype=torch.float64) / 64
    base = torch.randint(-100, 100, (per, k)).double()
    v = (base + frac).reshape(-1)
    s = torch.tensor(0.25)
    x = (v * 0.25).float()  # exact: v has 6 fraction bits, |v| < 2^7
    codes = (oq.unpack_dequantize(_stochastic(x, s, bits=8, seed=123), s, bits=8, shape=x.shape)
             / s).double()
    up = (codes - v.floor()).view(per, k)
    assert ((up == 0) | (up == 1)).all()
    p = frac
    chi2 = float(((up.sum(0) - per * p) ** 2 / (per * p * (1 - p))).sum())
    assert _chi2_z(chi2, k) < 5
    sd_mean = math.sqrt(float((p * (1 - p)).sum()) * per) / v.numel()
    assert abs(float(codes.mean() - v.mean())) < 5 * sd_mean
    # rounding directions of neighbouring elements at fraction 1/2 are uncorrelated
    half = _stochastic(torch.full((2 ** 18,), 0.125), s, bits=8, seed=5)  # v = 0.5
    b = half.view(torch.int8).double()
    assert ((b == 0) | (b == 1)).all()
    assert abs(_corr(b[:-1], b[1:])) < 5 / math.sqrt(b.numel())


# ------------------------------------------------------------------ errors

def _expect(exc, name, fn):
    with pytest.raises(exc, match=rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_]).*expected"):
        fn()


def _qp(device, **over):
    kw = dict(x=torch.randn(4, 6, device=device), scale=torch.tensor(0.1, device=device),
              zero_point=None, bits=4, axis=None)
    kw.update({k: (v(device) if callable(v) else v) for k, v in over.items()})
    return lambda: oq.quantize_pack(kw.pop("x"), kw.pop("scale"), kw.pop("zero_point"), **kw)


def _ud(device, **over):
    kw = dict(packed=torch.zeros(12, dtype=torch.uint8, device=device),
              scale=torch.tensor(0.1, device=device), zero_point=None, bits=4, shape=(4, 6),
              axis=None)
    kw.update({k: (v(device) if callable(v) else v) for k, v in over.items()})
    return lambda: oq.unpack_dequantize(kw.pop("packed"), kw.pop("scale"), kw.pop("zero_point"),
                                        **kw)


def _unpack(device, packed, bits=4, numel=6):
    return lambda: oq.unpack(packed(device), bits, numel)


ERRORS = [
    ("pack_int32", TypeError, "q", lambda d: lambda: oq.pack(torch.zeros(3, dtype=torch.int32, device=d), 4)),
    ("pack_float", TypeError, "q", lambda d: lambda: oq.pack(torch.zeros(3, device=d), 8)),
    ("pack_bits_3", ValueError, "bits", lambda d: lambda: oq.pack(torch.zeros(3, dtype=torch.int8, device=d), 3)),
    ("pack_bits_16", ValueError, "bits", lambda d: lambda: oq.pack(torch.zeros(3, dtype=torch.int8, device=d), 16)),
    ("unpack_int8_packed", TypeError, "packed", lambda d: _unpack(d, lambda d: torch.zeros(3, dtype=torch.int8, device=d))),
    ("unpack_short", ValueError, "packed", lambda d: _unpack(d, lambda d: torch.zeros(2, dtype=torch.uint8, device=d))),
    ("unpack_long", ValueError, "packed", lambda d: _unpack(d, lambda d: torch.zeros(4, dtype=torch.uint8, device=d))),
    ("unpack_2d", ValueError, "packed", lambda d: _unpack(d, lambda d: torch.zeros(1, 3, dtype=torch.uint8, device=d))),
    ("unpack_int8_length", ValueError, "packed", lambda d: _unpack(d, lambda d: torch.zeros(3, dtype=torch.uint8, device=d), bits=8)),
    ("unpack_bits", ValueError, "bits", lambda d: _unpack(d, lambda d: torch.zeros(3, dtype=torch.uint8, device=d), bits=2)),
    ("unpack_numel", ValueError, "numel", lambda d: _unpack(d, lambda d: torch.zeros(0, dtype=torch.uint8, device=d), numel=-1)),
    ("qp_x_int8", TypeError, "x", lambda d: _qp(d, x=lambda d: torch.zeros(4, 6, dtype=torch.int8, device=d))),
    ("qp_x_float64", TypeError, "x", lambda d: _qp(d, x=lambda d: torch.zeros(4, 6, dtype=torch.float64, device=d))),
    ("qp_bits", ValueError, "bits", lambda d: _qp(d, bits=2)),
    ("qp_scale_dtype", TypeError, "scale", lambda d: _qp(d, scale=lambda d: torch.tensor(0.1, dtype=torch.float64, device=d))),
    ("qp_scale_shape", ValueError, "scale", lambda d: _qp(d, scale=lambda d: torch.ones(2, device=d))),
    ("qp_scale_channels", ValueError, "scale", lambda d: _qp(d, axis=1, scale=lambda d: torch.ones(4, device=d))),
    ("qp_zero_point_shape", ValueError, "zero_point", lambda d: _qp(d, axis=0, scale=lambda d: torch.ones(4, device=d), zero_point=lambda d: torch.zeros(6, device=d))),
    ("qp_axis", ValueError, "axis", lambda d: _qp(d, axis=2, scale=lambda d: torch.ones(4, device=d))),
    ("ud_packed_dtype", TypeError, "packed", lambda d: _ud(d, packed=lambda d: torch.zeros(12, dtype=torch.int8, device=d))),
    ("ud_packed_length", ValueError, "packed", lambda d: _ud(d, packed=lambda d: torch.zeros(13, dtype=torch.uint8, device=d))),
    ("ud_packed_length_bits8", ValueError, "packed", lambda d: _ud(d, bits=8)),
    ("ud_bits", ValueError, "bits", lambda d: _ud(d, bits=5)),
    ("ud_shape", ValueError, "shape", lambda d: _ud(d, shape=(4, -6))),
    ("ud_scale_dtype", TypeError, "scale", lambda d: _ud(d, scale=lambda d: torch.tensor(1, device=d))),
    ("ud_scale_shape", ValueError, "scale", lambda d: _ud(d, axis=-1, scale=lambda d: torch.ones(4, device=d))),
    ("ud_zero_point_shape", ValueError, "zero_point", lambda d: _ud(d, zero_point=lambda d: torch.zeros(3, device=d))),
    ("ud_axis", ValueError, "axis", lambda d: _ud(d, axis=-3, scale=lambda d: torch.ones(4, device=d))),
]


@pytest.mark.parametrize("name,exc,arg,build", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_argument(plain_device, name, exc, arg, build):
    _expect(exc, arg, build(plain_device))


@pytest.mark.parametrize("signed,bad", [(True, 8), (True, -9), (True, 127), (False, 16),
                                        (False, 255)])
def test_pack_out_of_range_cpu(signed, bad):
    q = torch.zeros(40001, dtype=torch.int8 if signed else torch.uint8)
    q[30000] = bad
    q[39999] = bad
    lo, hi = _range(4, signed)
    with pytest.raises(ValueError, match=rf"pack: q expected int4 codes in \[{lo}, {hi}\], got "
                                         rf"{bad} at index 30000"):
        oq.pack(q, 4)
    oq.pack(q, 8)  # any int8 / uint8 value is a valid 8-bit code


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")], ids=str)
def test_bad_scale_value_cpu(value):
    s = torch.full((4,), 0.1)
    s[3] = value
    _expect(ValueError, "scale", _qp("cpu", axis=0, scale=s))
    _expect(ValueError, "scale", _ud("cpu", axis=0, scale=s))


def test_bad_zero_point_value_cpu():
    _expect(ValueError, "zero_point", _qp("cpu", zero_point=torch.tensor(float("nan"))))


def test_generator_on_other_device_cpu_x():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA generator")
    g = torch.Generator(device="cuda")
    _expect(ValueError, "generator",
            lambda: oq.quantize_pack(torch.randn(4), torch.tensor(0.1), bits=4, stochastic=True,
                                     generator=g))


def test_raw_ops_check_too():
    # the checks live in C++: calling torch.ops.oqfl directly is equally guarded
    _expect(ValueError, "packed", lambda: torch.ops.oqfl.unpack(
        torch.zeros(2, dtype=torch.uint8), 4, 6))
    _expect(ValueError, "q", lambda: torch.ops.oqfl.pack(torch.full((3,), 9, dtype=torch.int8), 4))


# ------------------------------------------------------------------ opcheck and compile

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_pack_unpack(plain_device, bits, signed):
    for n in (0, 7, 10):
        q = _codes((n,), bits, signed, plain_device)
        torch.library.opcheck(torch.ops.oqfl.pack.default, (q, bits))
        packed = oq.pack(q, bits)
        torch.library.opcheck(torch.ops.oqfl.unpack.default, (packed, bits, n, signed))
    torch.library.opcheck(torch.ops.oqfl.pack.default, (_codes((3, 5), bits, signed, plain_device).t(), bits))


@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_quantize_pack_unpack_dequantize(plain_device, bits, axis, with_zp):
    s, z = _params(SHAPE, axis, with_zp, bits, plain_device)
    x = torch.randn(SHAPE, device=plain_device)
    kw = dict(bits=bits, axis=axis)
    torch.library.opcheck(torch.ops.oqfl.quantize_pack.default, (x, s, z), kw)
    packed = oq.quantize_pack(x, s, z, **kw)
    torch.library.opcheck(torch.ops.oqfl.unpack_dequantize.default, (packed, s, z),
                          dict(kw, shape=list(SHAPE)))


def test_opcheck_quantize_pack_stochastic(plain_device):
    x = torch.randn(SHAPE, device=plain_device).to(torch.bfloat16)
    s = torch.tensor(0.1, device=plain_device)
    # default generator: opcheck restores the RNG state between its runs, so all tests apply
    torch.library.opcheck(torch.ops.oqfl.quantize_pack.default, (x, s, None),
                          dict(bits=4, stochastic=True))
    # an explicit generator advances between opcheck's eager and traced runs, so their codes
    # differ by design (as for any op given a generator); every other test applies
    g = torch.Generator(device=plain_device).manual_seed(0)
    torch.library.opcheck(torch.ops.oqfl.quantize_pack.default, (x, s, None),
                          dict(bits=8, stochastic=True, generator=g),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_compile_round_trip(plain_device):
    torch._dynamo.reset()

    def f(x, s):
        return oq.unpack_dequantize(oq.quantize_pack(x * 2, s, bits=4, axis=1), s, bits=4,
                                    shape=x.shape, axis=1)

    x = torch.randn(8, 6, device=plain_device)
    s = torch.rand(6, device=plain_device) + 0.1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, s), f(x, s), rtol=0, atol=0)


# ------------------------------------------------------------------ CUDA matches CPU

@requires_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_matches_cpu(bits):
    shape = (5, 17, 33)
    for axis in (None, 1):
        s, z = _params(shape, axis, True, bits, "cpu", pow2=False)
        x = torch.randn(shape)
        cpu = oq.quantize_pack(x, s, z, bits=bits, axis=axis)
        gpu = oq.quantize_pack(x.cuda(), s.cuda(), z.cuda(), bits=bits, axis=axis)
        assert torch.equal(gpu.cpu(), cpu)
        # stochastic: the same seed (a CPU generator) gives the same bits on both devices
        st_cpu = _stochastic(x, s, z, bits=bits, axis=axis, seed=42)
        st_gpu = _stochastic(x.cuda(), s.cuda(), z.cuda(), bits=bits, axis=axis, seed=42)
        assert torch.equal(st_gpu.cpu(), st_cpu)
        y = oq.unpack_dequantize(gpu, s.cuda(), z.cuda(), bits=bits, shape=shape, axis=axis)
        assert torch.equal(y.cpu(), oq.unpack_dequantize(cpu, s, z, bits=bits, shape=shape,
                                                         axis=axis))


@requires_cuda
def test_cuda_stochastic_with_cuda_generator():
    x = torch.randn(1000, device="cuda")
    s = torch.tensor(0.1, device="cuda")
    a = _stochastic(x, s, seed=1, gen_device="cuda")
    assert torch.equal(a, _stochastic(x, s, seed=1, gen_device="cuda"))
    assert not torch.equal(a, _stochastic(x, s, seed=2, gen_device="cuda"))


@requires_cuda
def test_cuda_bad_scale_gives_code_zero():
    x = torch.ones(4, 3, device="cuda")
    s = torch.tensor([1.0, 0.0, 1.0], device="cuda")
    codes = oq.unpack(oq.quantize_pack(x, s, bits=4, axis=1), 4, 12).view(4, 3)
    assert (codes[:, 1] == 0).all() and (codes[:, [0, 2]] == 1).all()
    y = oq.unpack_dequantize(oq.pack(torch.ones(12, dtype=torch.int8, device="cuda"), 4), s,
                             bits=4, shape=(4, 3), axis=1)
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, [0, 2]]).any()


# ------------------------------------------------------------------ SIMD paths vs the portable one

def _awkward_x(shape, dtype):
    """Values of every magnitude (v = x / s from 1e-9 to 1e4, so clamped, tiny negatives just
    below an integer whose fraction is not on u's 2^-24 grid, huge), signed zeros, NaN and inf."""
    n = math.prod(shape)
    x = torch.randn(n) * torch.pow(10.0, torch.empty(n).uniform_(-9, 3))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0,
                            -0.125 + 2.0 ** -26, -2.0 ** -30, 0.5, -0.5, 1.5, 2.5, -2.5,
                            3.0e38, -3.0e38, 1.0e-45, -1.0e-45, 7.5, -8.5, 127.5, -128.5])
    idx = torch.randperm(n)[: min(n, 3 * len(special))]
    x[idx] = special.repeat(3)[: len(idx)]
    return x.view(shape).to(dtype)


def _pack_paths(capability, x, s, z, bits, axis, stochastic, threads):
    """(packed, dequantized) under `capability` with `threads` threads."""
    prev_cap = torch.ops.oqfl._cpu_capability()
    prev_threads = torch.get_num_threads()
    try:
        torch.ops.oqfl._set_cpu_capability(capability)
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(2024) if stochastic else None
        packed = oq.quantize_pack(x, s, z, bits=bits, axis=axis, stochastic=stochastic,
                                  generator=g)
        y = oq.unpack_dequantize(packed, s, z, bits=bits, shape=x.shape, axis=axis)
    finally:
        torch.set_num_threads(prev_threads)
        torch.ops.oqfl._set_cpu_capability(prev_cap)
    return packed, y


def _same_bits(a, b):
    """float32 tensors equal bit for bit (a signed zero included)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.int32),
                                              b.reshape(-1).view(torch.int32))


def _simd_cases():
    # (shape, axis): rows of 1..33 elements (per-channel along axis 0: a row of `length`
    # elements shares one step size, and odd lengths make int4 bytes straddle rows), the
    # channel axis last or in the middle, per-tensor, and tensors spanning many chunks.
    for length in range(1, 34):
        yield (5, length), 0
        yield (3, length), -1
        yield (length,), None
    yield (2, 7, 3), 1
    yield (4, 1, 9), 0
    yield (3, 33, 17), 2
    yield (37, 70001 // 37), 0
    yield (1001, 67), 0
    yield (67, 1001), -1
    yield (70001,), None


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_simd_paths_equal_portable_bit_for_bit(bits, stochastic):
    caps = [c for c in supported_capabilities() if c != "default"]
    if not caps:
        pytest.skip("no SIMD path on this CPU")
    for (shape, axis) in _simd_cases():
        for with_zp in (False, True):
            s, z = _params(shape, axis, with_zp, bits, "cpu", pow2=False)
            if with_zp:  # offsets need not be integers
                z = z + torch.rand(z.shape) - 0.5
            dtypes = FLOAT_DTYPES if math.prod(shape) < 4096 else [torch.float32]
            for dtype in dtypes:
                x = _awkward_x(shape, dtype)
                want = _pack_paths("default", x, s, z, bits, axis, stochastic, 1)
                for cap in caps:
                    for threads in (1, 2):
                        got = _pack_paths(cap, x, s, z, bits, axis, stochastic, threads)
                        where = f"{cap} {threads} threads {shape} axis={axis} {dtype} zp={with_zp}"
                        assert torch.equal(got[0], want[0]), where
                        assert _same_bits(got[1], want[1]), where
