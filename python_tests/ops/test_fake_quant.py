"""Numerics of torch.ops.oqfl.fake_quant / fake_quant_backward against the float64 reference
(python_tests/reference.py) and PyTorch's learnable fake-quantize ops.

Most inputs are dyadic (v = x/s + z on a 1/8 grid, power-of-two scales, integer offsets), so
every quantity of the contract is exact in float32 and y / grad_x are compared bit for bit,
with exact .5 ties and exact quant_min / quant_max values in every tensor. Random-data tests
exclude only elements within ~1e-5 of a tie, where float32 and float64 may legitimately differ.
The `device` fixture runs each test on every CPU SIMD path and on CUDA (skipped without a GPU).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import helpers as h
import reference as ref
from oqfl_ext import ops as oq


def fq_autograd(x, scale, zp, dy, *, qmin, qmax, axis=None, grad_factor=1.0):
    """Forward and the three gradients through autograd (the registered formula)."""
    xr = x.detach().clone().requires_grad_(True)
    sr = scale.detach().clone().requires_grad_(True)
    zr = None if zp is None else zp.detach().clone().requires_grad_(True)
    y = oq.fake_quant(xr, sr, zr, quant_min=qmin, quant_max=qmax, axis=axis,
                      grad_factor=grad_factor)
    y.backward(dy)
    return y.detach(), xr.grad, sr.grad, None if zr is None else zr.grad


def make_zp(kind, pshape, qmin, qmax, device):
    if kind == "none":
        return None
    return h.int_zero_point(pshape, qmin, qmax, device, even=(kind == "even"))


BITS = [(b, s) for b in range(2, 9) for s in (True, False)]


# ------------------------------------------------------------------ hand-worked case

@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_hand_worked(device, dtype):
    # s = 0.5, z = 0, 2-bit signed [-2, 1], dy = 1. v = -2.5 rounds to -2 (even, in range),
    # v = 1.5 rounds to 2 (above); v = -2 and v = 1 sit exactly on the bounds (in range).
    x = torch.tensor([-1.5, -1.25, -1.0, -0.25, 0.25, 0.5, 0.75, 0.375, 100.0, -100.0],
                     dtype=dtype, device=device)
    s = torch.tensor(0.5, device=device)
    z = torch.tensor(0.0, device=device)
    y, dx, ds, dz = fq_autograd(x, s, z, torch.ones_like(x), qmin=-2, qmax=1)
    assert y.dtype == dtype
    assert y.float().tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -1.0]
    assert dx.float().tolist() == [0, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    assert ds.shape == () and ds.item() == -1.25
    assert dz.shape == () and dz.item() == -2.0
    # without zero_point: same output and grad_scale
    y2, _, ds2, dz2 = fq_autograd(x, s, None, torch.ones_like(x), qmin=-2, qmax=1)
    assert torch.equal(y2, y) and ds2.item() == -1.25 and dz2 is None


# ------------------------------------------------------------------ per-tensor

@pytest.mark.parametrize("zp_kind", ["none", "even", "any"])
@pytest.mark.parametrize("bits,signed", BITS)
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_per_tensor_exact(device, dtype, bits, signed, zp_kind):
    qmin, qmax = h.bit_range(bits, signed)
    pshape = () if bits % 2 else (1,)  # both accepted per-tensor shapes
    s = h.pow2_scale(pshape, device)
    z = make_zp(zp_kind, pshape, qmin, qmax, device)
    shape = (37, 41)  # odd sizes: SIMD tails
    x = h.dyadic_x(shape, s, z, qmin, qmax, dtype, device)
    dy = h.dyadic_dy(shape, dtype, device)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax)
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax)
    if zp_kind != "any":  # the peer rounds differently on ties with odd offsets
        h.check_vs_peer(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax)


# ------------------------------------------------------------------ per-channel

PER_CHANNEL_CASES = [
    ((6, 5, 7), 0),     # first axis
    ((6, 5, 7), 1),     # middle
    ((6, 5, 7), 2),     # last
    ((6, 5, 7), -1),    # negative = last
    ((4, 3, 5, 5), -3),  # negative = a middle one (conv activations, NCHW)
    ((9,), 0),          # 1-D: one element per channel
    ((5, 1, 3), 1),     # a single channel
    ((5, 4, 5), 0),     # equal first and last dims: using the wrong axis would go unnoticed
    ((3, 5, 5), 1),     # by shape checks
]


@pytest.mark.parametrize("zp_kind", ["none", "even", "any"])
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (4, False),
                                         (8, True), (8, False)])
@pytest.mark.parametrize("shape,axis", PER_CHANNEL_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_per_channel_exact(device, dtype, shape, axis, bits, signed, zp_kind):
    qmin, qmax = h.bit_range(bits, signed)
    pshape = (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = make_zp(zp_kind, pshape, qmin, qmax, device)
    x = h.dyadic_x(shape, s, z, qmin, qmax, dtype, device, axis=axis)
    dy = h.dyadic_dy(shape, dtype, device)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis)
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis)
    if zp_kind != "any":
        h.check_vs_peer(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis)


def test_per_channel_scales_are_used_per_channel(device):
    # channel c of a [2, 3] tensor along axis 1 must use scale[c], not scale[flat index % 3]
    # or any other mix-up: each channel gets a very different step
    x = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]], device=device)
    s = torch.tensor([1.0, 2.0, 4.0], device=device)
    y = oq.fake_quant(x, s, quant_min=-8, quant_max=7, axis=1)
    # v = [[1, .5, .25], [3, 1.5, .75]] -> q = [[1, 0, 0], [3, 2, 1]]
    assert y.tolist() == [[1.0, 0.0, 0.0], [3.0, 4.0, 4.0]]
    y0 = oq.fake_quant(x.t(), s, quant_min=-8, quant_max=7, axis=0)
    assert torch.equal(y0, y.t())


# ------------------------------------------------------------------ random data

@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_random_data(device, dtype, axis):
    # continuous data, non power-of-two scales: exact except within ~1e-5 of a tie
    qmin, qmax = h.bit_range(4, True)
    shape = (33, 17, 29)
    pshape = () if axis is None else (shape[axis],)
    s = (torch.rand(pshape) * 0.3 + 0.05).to(device)
    z = h.int_zero_point(pshape, qmin, qmax, device, even=True)
    x = (torch.randn(shape) * 1.5).to(dtype).to(device)
    dy = torch.randn(shape).to(dtype).to(device)
    g = 0.3
    skip = ref.near_tie_mask(x, s, z, axis=axis)
    assert skip.sum().item() <= 0.01 * x.numel()  # the exclusion stays negligible
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis, grad_factor=g)
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                         grad_factor=g, exact=False, skip=skip)
    h.check_vs_peer(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                    grad_factor=g, skip=skip)


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_non_integer_zero_point(device, dtype, axis):
    # LSQ+ offsets are real numbers; the peer op rounds them, so only the reference applies
    qmin, qmax = h.bit_range(8, False)
    shape = (21, 13, 11)
    pshape = () if axis is None else (shape[axis],)
    s = (torch.rand(pshape) * 0.005 + 0.01).to(device)
    z = (torch.rand(pshape) * 100 + 60.3).to(device)
    assert (z != torch.round(z)).all()
    x = (torch.randn(shape) * 1.5).to(dtype).to(device)  # |x/s| up to ~500: both sides out
    dy = torch.randn(shape).to(dtype).to(device)
    skip = ref.near_tie_mask(x, s, z, axis=axis)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis)
    r = h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                             exact=False, skip=skip)
    assert r.below.any() and r.above.any()  # both out-of-range branches taken


# ------------------------------------------------------------------ grad_factor

@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("grad_factor", [0.0, 0.125, -2.0, "lsq"])
def test_grad_factor(device, axis, grad_factor):
    qmin, qmax = h.bit_range(4, False)
    shape = (12, 35)
    pshape = () if axis is None else (shape[axis],)
    if grad_factor == "lsq":
        grad_factor = oq.lsq_grad_factor(35 if axis is not None else 12 * 35, qmax)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device, even=True)
    x = h.dyadic_x(shape, s, z, qmin, qmax, torch.float32, device, axis=axis)
    dy = h.dyadic_dy(shape, torch.float32, device)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis,
                                grad_factor=grad_factor)
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                         grad_factor=grad_factor)
    h.check_vs_peer(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                    grad_factor=grad_factor)
    # the factor scales only the parameter gradients
    y1, dx1, ds1, dz1 = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis)
    assert torch.equal(y, y1) and torch.equal(dx, dx1)
    if grad_factor == 0.0:
        assert not ds.any() and not dz.any() and ds1.any()


# ------------------------------------------------------------------ output_mask

@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)),
                         ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("with_zp", [True, False])
@pytest.mark.parametrize("axis", [None, -1])
def test_output_mask(device, mask, with_zp, axis):
    qmin, qmax = h.bit_range(3, True)
    shape = (7, 19)
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device) if with_zp else None
    x = h.dyadic_x(shape, s, z, qmin, qmax, torch.float32, device, axis=axis)
    dy = h.dyadic_dy(shape, torch.float32, device)
    gx, gs, gz = oq.fake_quant_backward(dy, x, s, z, quant_min=qmin, quant_max=qmax, axis=axis,
                                        grad_factor=0.5, output_mask=mask)
    assert (gx is None) == (not mask[0])
    assert (gs is None) == (not mask[1])
    assert (gz is None) == (not (mask[2] and with_zp))
    h.check_vs_reference(x, s, z, dy, None, gx, gs, gz, qmin=qmin, qmax=qmax, axis=axis,
                         grad_factor=0.5)
    # the raw op fills skipped slots with empty [0] tensors
    raw = torch.ops.oqfl.fake_quant_backward(dy, x, s, z, quant_min=qmin, quant_max=qmax,
                                             axis=axis, grad_factor=0.5,
                                             output_mask=list(mask))
    wanted = [mask[0], mask[1], mask[2] and with_zp]
    for t, want, full in zip(raw, wanted, (gx, gs, gz)):
        if want:
            assert torch.equal(t, full)
        else:
            assert t.shape == (0,)


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("kind", ["transposed", "permuted", "step_slice", "offset_slice",
                                  "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(device, dtype, kind):
    qmin, qmax = h.bit_range(4, True)
    axis = 1  # per-channel, so the kernel must map each element to its channel by stride
    base_shape = {"transposed": (23, 9), "permuted": (5, 7, 9), "step_slice": (23, 27),
                  "offset_slice": (24, 31), "expanded": (1, 9)}[kind]
    view = {
        "transposed": lambda t: t.t(),                      # (9, 23), strides (1, 9)
        "permuted": lambda t: t.permute(2, 0, 1),           # (9, 5, 7)
        "step_slice": lambda t: t[::2, ::3],                # (12, 9)
        "offset_slice": lambda t: t[1:, 3:],                # (23, 28), storage offset
        "expanded": lambda t: t.expand(13, 9).t(),          # (9, 13), a zero stride
    }[kind]
    probe = view(torch.empty(base_shape))
    pshape = (probe.shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device)
    # build dyadic values in the view's own shape, then scatter them into the strided view
    xv = h.dyadic_x(probe.shape, s, z, qmin, qmax, dtype, device, axis=axis)
    base = torch.zeros(base_shape, dtype=dtype, device=device)
    x = view(base)
    if kind == "expanded":
        xv = xv[:, :1].expand_as(x)  # equal values along the broadcast dim
        base.copy_(xv[:, 0].reshape(1, 9))
    else:
        x.copy_(xv)
    assert not x.is_contiguous()
    dy = h.dyadic_dy(x.shape, dtype, device)
    y = oq.fake_quant(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    gx, gs, gz = oq.fake_quant_backward(dy, x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    h.check_vs_reference(x, s, z, dy, y, gx, gs, gz, qmin=qmin, qmax=qmax, axis=axis)
    if kind in ("transposed", "permuted"):  # dense: the layout is kept
        assert y.stride() == x.stride(), (x.stride(), y.stride())
        assert gx.stride() == x.stride(), (x.stride(), gx.stride())
    # the same through autograd on a non-contiguous leaf view
    if kind != "expanded":
        leaf = base.clone().requires_grad_(True)
        sr = s.clone().requires_grad_(True)
        zr = z.clone().requires_grad_(True)
        yv = oq.fake_quant(view(leaf), sr, zr, quant_min=qmin, quant_max=qmax, axis=axis)
        yv.backward(dy)
        assert torch.equal(yv.detach(), y)
        assert torch.equal(view(leaf.grad), gx)
        assert torch.equal(sr.grad, gs) and torch.equal(zr.grad, gz)


@pytest.mark.parametrize("axis", [None, 1, 0, -1])
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_channels_last(device, dtype, axis):
    qmin, qmax = h.bit_range(8, False)
    shape = (3, 8, 5, 7)
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device)
    x = h.dyadic_x(shape, s, z, qmin, qmax, dtype, device, axis=axis)
    x = x.contiguous(memory_format=torch.channels_last)
    dy = h.dyadic_dy(shape, dtype, device).contiguous(memory_format=torch.channels_last)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis)
    gx, _, _ = oq.fake_quant_backward(dy, x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    assert gx.stride() == x.stride()


# ------------------------------------------------------------------ empty

@pytest.mark.parametrize("shape,axis", [((0,), None), ((3, 0, 4), None), ((3, 0, 4), 0),
                                        ((3, 0, 4), 1), ((0, 4), -1)], ids=str)
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_empty(device, dtype, shape, axis):
    pshape = () if axis is None else (shape[axis],)
    s = torch.full(pshape, 0.25, device=device)
    z = torch.full(pshape, 2.0, device=device)
    x = torch.empty(shape, dtype=dtype, device=device)
    dy = torch.empty(shape, dtype=dtype, device=device)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=-8, qmax=7, axis=axis)
    h.assert_same_meta(x, y)
    h.assert_same_meta(x, dx)
    # nothing to sum: zero gradients of the parameters' shapes, not garbage
    assert ds.shape == s.shape and ds.dtype == torch.float32 and not ds.any()
    assert dz.shape == z.shape and dz.dtype == torch.float32 and not dz.any()


# ------------------------------------------------------------------ large / chunked

LARGE_CASES = [((1_000_003,), None), ((7, 142_859), 0), ((1_001, 999), -1),
               ((3, 5, 66_667), 1)]


@pytest.mark.parametrize("shape,axis", LARGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large(device, dtype, shape, axis):
    # more than one parallel chunk, odd sizes: chunk boundaries and SIMD tails
    qmin, qmax = h.bit_range(8, True)
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device, even=True)
    x = h.dyadic_x(shape, s, z, qmin, qmax, dtype, device, axis=axis)
    dy = h.dyadic_dy(shape, dtype, device)
    y, dx, ds, dz = fq_autograd(x, s, z, dy, qmin=qmin, qmax=qmax, axis=axis,
                                grad_factor=0.01)
    h.check_vs_reference(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                         grad_factor=0.01)
    if dtype == torch.float32:
        h.check_vs_peer(x, s, z, dy, y, dx, ds, dz, qmin=qmin, qmax=qmax, axis=axis,
                        grad_factor=0.01)


# ------------------------------------------------------------------ special values

@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_nan_and_inf(device, dtype, axis):
    qmin, qmax = h.bit_range(4, True)
    shape = (3, 37)
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, qmin, qmax, device)
    x = h.dyadic_x(shape, s, z, qmin, qmax, dtype, device, axis=axis)
    nan_at = [(0, 0), (1, 17), (2, 36)]  # first, a middle one, and the last (a SIMD tail)
    for i, j in nan_at:
        x[i, j] = float("nan")
    x[0, 5] = float("inf")
    x[2, 3] = -float("inf")
    y = oq.fake_quant(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    nan = torch.isnan(y).cpu()
    assert nan.sum().item() == len(nan_at)
    assert all(nan[i, j] for i, j in nan_at)
    # +-inf clamp to the range ends like any value far outside it; the rest is unaffected
    y_ref = ref.fake_quant_ref(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis).cpu()
    fin = ~nan
    assert torch.equal(y.cpu().double()[fin], y_ref.to(dtype).double()[fin])


# ------------------------------------------------------------------ CPU paths

def _random_case(axis):
    shape = (17, 1029)
    pshape = () if axis is None else (shape[axis],)
    s = torch.rand(pshape) * 0.2 + 0.01
    z = h.int_zero_point(pshape, -128, 127, "cpu")
    x = torch.randn(shape) * 3
    dy = torch.randn(shape)
    return x, s, z, dy


@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("dtype", h.FLOAT_DTYPES)
def test_cpu_paths_agree(use_capability, dtype, axis):
    # every SIMD path evaluates the same float32 contract: identical y and grad_x bits
    x, s, z, dy = _random_case(axis)
    x, dy = x.to(dtype), dy.to(dtype)
    from conftest import supported_capabilities

    outs = {}
    skip = ref.near_tie_mask(x, s, z, axis=axis)
    for cap in supported_capabilities():
        use_capability(cap)
        y = oq.fake_quant(x, s, z, quant_min=-128, quant_max=127, axis=axis)
        gx, gs, gz = oq.fake_quant_backward(dy, x, s, z, quant_min=-128, quant_max=127,
                                            axis=axis)
        outs[cap] = (y, gx)
        # summation order may differ between paths: each must be right, not identical
        h.check_vs_reference(x, s, z, dy, None, None, gs, gz, qmin=-128, qmax=127, axis=axis,
                             exact=False, skip=skip)
    names = list(outs)
    for cap in names[1:]:
        for k, what in enumerate(("y", "grad_x")):
            a, b = outs[names[0]][k], outs[cap][k]
            diff = (a != b) & ~(torch.isnan(a) & torch.isnan(b))
            assert not diff.any(), (
                f"{what} differs between {names[0]} and {cap} at x={x[diff][:5].tolist()}: "
                f"{a[diff][:5].tolist()} vs {b[diff][:5].tolist()}")


def test_capability_hooks():
    from conftest import CAPABILITIES, supported_capabilities

    ops = torch.ops.oqfl
    assert ops._cpu_capability() in CAPABILITIES
    assert oq.cpu_capability() == ops._cpu_capability()
    caps = supported_capabilities()
    assert "default" in caps  # the portable path is always there
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl")):
        assert "avx512" in caps  # this machine must be able to run its best path
    if " avx2" in flags:
        assert "avx2" in caps
    prev = ops._cpu_capability()
    try:
        for cap in caps:
            before = ops._cpu_capability()
            assert ops._set_cpu_capability(cap) == before  # returns the previous one
            assert ops._cpu_capability() == cap
    finally:
        ops._set_cpu_capability(prev)


# ------------------------------------------------------------------ determinism (CPU)

def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_grad_scale_deterministic(capability, restore_threads, axis):
    # grad_scale / grad_zero_point are summed per fixed-size chunk: the same bits every run
    # and whatever the thread count
    shape = (3, 333_337) if axis is not None else (1_000_003,)
    pshape = () if axis is None else (shape[axis],)
    s = torch.rand(pshape) * 0.05 + 0.01
    z = h.int_zero_point(pshape, 0, 255, "cpu")
    x = torch.randn(shape) + 1.0
    dy = torch.randn(shape)

    def grads():
        _, gs, gz = oq.fake_quant_backward(dy, x, s, z, quant_min=0, quant_max=255, axis=axis,
                                           grad_factor=0.1)
        return gs, gz

    torch.set_num_threads(2)
    gs2, gz2 = grads()
    gs2b, gz2b = grads()
    torch.set_num_threads(1)
    gs1, gz1 = grads()
    for a, b in ((gs2, gs2b), (gz2, gz2b), (gs2, gs1), (gz2, gz1)):
        assert torch.equal(_bits(a), _bits(b)), (a, b)
    # and the deterministic answer is also a correct one
    h.check_vs_reference(x, s, z, dy, None, None, gs1, gz1, qmin=0, qmax=255, axis=axis,
                         grad_factor=0.1, exact=False, skip=ref.near_tie_mask(x, s, z, axis=axis))
