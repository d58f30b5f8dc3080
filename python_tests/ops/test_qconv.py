"""Integer inference ops qconv2d / qlinear (contract and weight layout in csrc/qconv_args.h).

* Exact agreement (torch.equal) with the int64 reference of reference.py on shapes chosen to
  cover every stride 1..3, padding 0..3, dilation 1..2, groups 1/2/3/depthwise, kernels 1x1 to
  7x7 and non-square, odd channel and spatial sizes, batch 1 and more, NCHW and channels_last,
  float / uint8 / int8 input with signed and unsigned code ranges, int4 and int8 weights, bias
  and relu; under every CPU code path and on CUDA (skipped without a GPU).
* Agreement with F.conv2d / F.linear on the dequantized tensors, to float32 rounding.
* The blocked weight layout: golden bytes, the index formula of qconv_args.h written out,
  round trips, the nibble order of the pack op.
* torch.library.opcheck, torch.compile, and every argument error, in the kernels and in the
  fake kernels (oqfl_ext/_meta.py).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import requires_cuda
from oqfl_ext import ops as oq

Pair = Tuple[int, int]


# ------------------------------------------------------------------ cases

@dataclass(frozen=True)
class ConvCase:
    n: int
    c: int
    hw: Pair
    oc: int
    k: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    w_bits: int = 8
    x_kind: str = "float"          # "float" (quantized in the op), "uint8" / "int8" (codes)
    qrange: Pair = (0, 255)        # x_quant_min/max (float), or the range of the codes
    bias: bool = False
    relu: bool = False
    channels_last: bool = False
    zp: Optional[int] = None       # None: random inside qrange

    def __str__(self):
        f = lambda p: f"{p[0]}x{p[1]}" if p[0] != p[1] else str(p[0])  # noqa: E731
        g = "dw" if self.groups == self.c else str(self.groups)
        return (f"n{self.n}c{self.c}_{f(self.hw)}-oc{self.oc}k{f(self.k)}s{f(self.stride)}"
                f"p{f(self.padding)}d{f(self.dilation)}g{g}-w{self.w_bits}-{self.x_kind}"
                f"{self.qrange[0]}_{self.qrange[1]}{'-b' if self.bias else ''}"
                f"{'-relu' if self.relu else ''}{'-cl' if self.channels_last else ''}"
                f"{'' if self.zp is None else f'-zp{self.zp}'}")

    def out_hw(self):
        return tuple((self.hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.k[i] - 1) - 1)
                     // self.stride[i] + 1 for i in range(2))


HAND_CASES = [
    ConvCase(1, 3, (5, 5), 1, (1, 1)),
    ConvCase(2, 37, (9, 11), 35, (3, 3), padding=(1, 1), w_bits=4, qrange=(0, 15), bias=True,
             relu=True, channels_last=True),
    ConvCase(3, 19, (13, 10), 19, (3, 3), stride=(2, 2), padding=(1, 1), groups=19,
             x_kind="uint8", bias=True, channels_last=True),
    ConvCase(2, 12, (15, 14), 24, (5, 5), padding=(2, 2), dilation=(2, 2), groups=12, w_bits=4,
             qrange=(-8, 7), relu=True),
    ConvCase(1, 6, (17, 19), 9, (7, 7), stride=(3, 3), padding=(3, 3), groups=3,
             x_kind="int8", qrange=(-128, 127), bias=True),
    ConvCase(2, 10, (8, 13), 34, (1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2),
             groups=2, w_bits=4, qrange=(-128, 127), bias=True, relu=True, channels_last=True),
    ConvCase(5, 66, (7, 6), 48, (3, 1), stride=(2, 3), padding=(2, 0), dilation=(2, 1),
             groups=3),
    ConvCase(1, 5, (37, 41), 17, (2, 5), stride=(3, 3), padding=(3, 2), dilation=(2, 2),
             w_bits=4, x_kind="uint8", qrange=(0, 15)),
    ConvCase(4, 64, (6, 6), 64, (1, 1), channels_last=True),
    ConvCase(2, 33, (11, 9), 40, (3, 3), x_kind="int8", qrange=(-8, 7), relu=True,
             channels_last=True),
    ConvCase(1, 7, (3, 3), 5, (3, 3), padding=(3, 3), dilation=(2, 2), bias=True),
    ConvCase(2, 8, (6, 7), 20, (3, 3), padding=(1, 1), w_bits=4, qrange=(0, 15), zp=200,
             bias=True),   # zero point outside [x_quant_min, x_quant_max], inside 0..255
    ConvCase(1, 4, (4, 4), 3, (4, 4), stride=(2, 2), qrange=(-8, 7), zp=-128),
    ConvCase(3, 21, (5, 23), 7, (5, 5), stride=(1, 3), padding=(2, 3), groups=7, w_bits=4,
             x_kind="int8", qrange=(-128, 127), channels_last=True),
]


def _random_cases(count: int, seed: int = 20261125):
    """Cases whose options cycle with co-prime periods, so their combinations vary; sizes
    random (odd sizes likely), the spatial size bumped until the output is not empty."""
    rnd = random.Random(seed)
    kernels = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 2), (2, 5), (5, 3)]
    ranges = [("float", (0, 255)), ("float", (0, 15)), ("float", (-8, 7)),
              ("float", (-128, 127)), ("uint8", (0, 255)), ("int8", (-128, 127)),
              ("uint8", (0, 15)), ("int8", (-8, 7))]
    cases = []
    for i in range(count):
        k = kernels[i % len(kernels)]
        stride = (i % 3 + 1, (i // 3) % 3 + 1)
        padding = (i % 4, (i + 1 + i // 4) % 4)
        dilation = (i % 2 + 1, (i // 2) % 2 + 1)
        gsel = i % 4   # 1, 2, 3, depthwise
        if gsel == 3:
            c = rnd.randint(2, 24)
            groups, oc = c, c * rnd.choice([1, 2])
        else:
            groups = gsel + 1
            c = groups * rnd.randint(1, 23)
            oc = groups * rnd.randint(1, 21)
        x_kind, qrange = ranges[i % len(ranges)]
        hw = [rnd.randint(1, 19), rnd.randint(1, 19)]
        for d in range(2):
            hw[d] = max(hw[d], dilation[d] * (k[d] - 1) + 1 - 2 * padding[d])
        cases.append(ConvCase(
            n=rnd.choice([1, 1, 2, 3, 5]), c=c, hw=tuple(hw), oc=oc, k=k, stride=stride,
            padding=padding, dilation=dilation, groups=groups, w_bits=(4, 8)[(i // 2) % 2],
            x_kind=x_kind, qrange=qrange, bias=(i % 5) in (0, 2, 3), relu=(i % 3) == 1,
            channels_last=(i % 7) in (1, 2, 4, 6) and c > 1))
    return cases


CONV_CASES = HAND_CASES + _random_cases(24)


def test_conv_cases_cover_the_grid():
    # the parametrization below promises this coverage; keep it honest when editing the lists
    cs = CONV_CASES
    assert {s for c in cs for s in c.stride} == {1, 2, 3}
    assert {p for c in cs for p in c.padding} == {0, 1, 2, 3}
    assert {d for c in cs for d in c.dilation} == {1, 2}
    assert {1, 2, 3} <= {c.groups for c in cs}
    assert any(c.groups == c.c == c.oc for c in cs) and any(c.groups == c.c < c.oc for c in cs)
    assert {(1, 1), (3, 3), (5, 5), (7, 7)} <= {c.k for c in cs}
    assert any(c.k[0] != c.k[1] for c in cs)
    assert {c.n for c in cs} >= {1, 2} and any(c.n > 2 for c in cs)
    assert {c.channels_last for c in cs} == {True, False}
    assert {(c.x_kind, c.qrange) for c in cs} >= {
        ("float", (0, 255)), ("float", (0, 15)), ("float", (-8, 7)), ("float", (-128, 127)),
        ("uint8", (0, 255)), ("int8", (-128, 127)), ("uint8", (0, 15)), ("int8", (-8, 7))}
    assert {(c.w_bits, c.bias, c.relu) for c in cs} == set(
        itertools.product((4, 8), (False, True), (False, True)))
    assert any(c.c % 2 and c.hw[0] % 2 and c.hw[1] % 2 for c in cs)
    assert any(c.oc // c.groups > 16 for c in cs) and any(c.c // c.groups > 4 for c in cs)
    assert all(min(c.out_hw()) >= 1 for c in cs)


# ------------------------------------------------------------------ input builders

def _x_scale(shape_1: bool, pow2: bool) -> torch.Tensor:
    v = 2.0 ** -5 if pow2 else 0.0371
    return torch.tensor([v] if shape_1 else v, dtype=torch.float32)


def _activations(shape, kind, qrange, zp, scale):
    """float x whose codes span [qmin - 3, qmax + 3] (so both clamps trigger), on a 1/4 grid
    (exact .5 ties with a power-of-two scale); or integer codes inside qrange."""
    qmin, qmax = qrange
    if kind == "float":
        v = torch.randint((qmin - 3) * 4, (qmax + 3) * 4 + 1, shape).to(torch.float64) / 4
        if torch.rand(()) < 0.5:
            v = v + (torch.rand(shape, dtype=torch.float64) - 0.5) * 0.5   # off the grid
        return ((v - zp) * float(scale.reshape(()))).to(torch.float32)
    return torch.randint(qmin, qmax + 1, shape).to(torch.uint8 if kind == "uint8" else torch.int8)


def _weights(shape, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = torch.randint(lo, hi + 1, shape)
    w.view(-1)[: min(4, w.numel())] = torch.tensor([lo, hi, lo, hi])[: min(4, w.numel())]
    return w.to(torch.int8)


def _scalars(qrange, zp, i):
    zp = torch.randint(qrange[0], qrange[1] + 1, ()).item() if zp is None else zp
    x_scale = _x_scale(shape_1=i % 2 == 1, pow2=i % 3 != 2)
    x_zp = torch.tensor([zp] if i % 2 else zp, dtype=(torch.int32, torch.int64)[i % 2])
    return zp, x_scale, x_zp


@dataclass
class ConvInputs:
    args: tuple       # positional arguments of qconv2d (CPU tensors)
    kwargs: dict
    w_codes: torch.Tensor

    def to(self, device):
        return tuple(None if a is None else a.to(device) for a in self.args)


def _conv_inputs(case: ConvCase, salt: int = 0) -> ConvInputs:
    i = CONV_CASES.index(case) + salt if case in CONV_CASES else salt
    zp, x_scale, x_zp = _scalars(case.qrange, case.zp, i)
    x = _activations((case.n, case.c) + case.hw, case.x_kind, case.qrange, zp, x_scale)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w_codes = _weights((case.oc, case.c // case.groups) + case.k, case.w_bits)
    w_packed = oq.pack_conv_weight(w_codes, case.w_bits, case.groups)
    w_scale = (torch.rand(case.oc) * 0.05 + 0.001).to(torch.float32)
    bias = torch.randn(case.oc) if case.bias else None
    kwargs = dict(w_bits=case.w_bits, stride=case.stride, padding=case.padding,
                  dilation=case.dilation, groups=case.groups, relu=case.relu)
    if case.x_kind == "float":
        kwargs.update(x_quant_min=case.qrange[0], x_quant_max=case.qrange[1])
    return ConvInputs((x, x_scale, x_zp, w_packed, w_scale, bias), kwargs, w_codes)


def _assert_equal(got, want, what=""):
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} vs " \
                                                  f"{tuple(want.shape)}"
    got = got.cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {want.numel()} elements differ; first at {idx}: got "
            f"{got[idx].item()!r}, expected {want[idx].item()!r}; differing output channels "
            f"{sorted(set(bad[:, 1].tolist()))[:10] if want.dim() == 4 else ''}")


def _expected_format(x):
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


# ------------------------------------------------------------------ qconv2d vs the reference

@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_qconv2d_matches_reference(device, case):
    inp = _conv_inputs(case)
    want = ref.qconv2d_ref(*inp.args, **inp.kwargs)
    args = inp.to(device)
    out = oq.qconv2d(*args, **inp.kwargs)
    assert out.device == args[0].device
    fmt = _expected_format(args[0])
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()}, expected {fmt}"
    _assert_equal(out, want, str(case))
    if case.relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("case", CONV_CASES[::5], ids=str)
def test_reference_accumulator_is_exact(case):
    # the int64 accumulator of the reference against F.conv2d on float64 codes (exact here:
    # integers below 2**53) with the input centered on the zero point and padded with 0
    u = torch.randint(-128, 256, (case.n, case.c) + case.hw)
    w = _weights((case.oc, case.c // case.groups) + case.k, 8).to(torch.int64)
    zp = 77
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
              groups=case.groups)
    acc = ref.qconv2d_acc_ref(u, zp, w, **kw)
    want = F.conv2d((u - zp).double(), w.double(), None, **kw)
    assert acc.dtype == torch.int64 and torch.equal(acc.double(), want)


def test_qconv2d_all_capabilities_agree(use_capability):
    # the three CPU paths give identical bits on one mid-sized case, run back to back
    from conftest import supported_capabilities
    inp = _conv_inputs(HAND_CASES[1])
    outs = []
    for cap in supported_capabilities():
        use_capability(cap)
        outs.append(oq.qconv2d(*inp.args, **inp.kwargs))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# Channel counts with 16-step chunks of the AMX tiles plus leftover k-steps, widths with full
# 16-pixel tiles plus VNNI pixel tails: merged kw * icb runs (groups 1, dilation 1: 3 * 19 = 57
# steps = 3 chunks + 9), per-kw runs (dilation 2: 19 = 16 + 3), an exact 16-step run (IC 64,
# 1x1), two slabs and a half one (OC 40), 4-bit weights, signed codes and a fused epilogue.
AMX_CASES = [
    ConvCase(2, 76, (5, 37), 40, (3, 3), padding=(1, 1), bias=True, relu=True,
             channels_last=True),
    ConvCase(1, 76, (6, 41), 17, (3, 3), padding=(2, 2), dilation=(2, 2), w_bits=4,
             x_kind="int8", qrange=(-128, 127), bias=True),
    ConvCase(2, 64, (3, 50), 32, (1, 1), x_kind="uint8", channels_last=True),
    ConvCase(1, 128, (4, 33), 24, (3, 3), stride=(1, 2), padding=(1, 1), groups=2,
             qrange=(-8, 7)),
    # stride 1, rows of fewer than 16 pixels: the AMX path takes several rows as one block of
    # virtual pixels (the padding columns between rows computed and dropped)
    ConvCase(2, 64, (7, 7), 40, (3, 3), padding=(1, 1), bias=True, relu=True,
             channels_last=True),
    ConvCase(1, 96, (4, 4), 16, (3, 3), padding=(1, 1), w_bits=4, x_kind="int8",
             qrange=(-128, 127)),
    ConvCase(3, 64, (14, 14), 32, (1, 1), x_kind="uint8", channels_last=True),
    # stride 2, one row at a time: 32 + 3 pixels (a pair of pixel tiles sharing B, then VNNI)
    ConvCase(1, 64, (9, 70), 24, (3, 3), stride=(2, 2), padding=(1, 1), bias=True),
    # runs shorter than a tile's 16 k-steps (the VNNI tiles take them): a 7x7 stride-2 stem on 3
    # channels, 16 channels 3x3 at batch 1, a dilated kernel with 4-bit weights
    ConvCase(2, 3, (23, 21), 20, (7, 7), stride=(2, 2), padding=(3, 3), bias=True, relu=True,
             channels_last=True),
    ConvCase(1, 16, (9, 12), 16, (3, 3), padding=(1, 1), x_kind="uint8"),
    ConvCase(1, 8, (11, 13), 40, (3, 3), padding=(2, 2), dilation=(2, 2), w_bits=4,
             x_kind="int8", qrange=(-128, 127)),
    # the block path with NCHW input and output (whole images per thread at 4 images), two
    # groups of 64 channels with 4-bit weights, and a dilated 5x5 window (wide gaps between rows)
    ConvCase(4, 96, (7, 7), 40, (3, 3), padding=(1, 1), bias=True),
    ConvCase(4, 128, (6, 9), 48, (3, 3), padding=(1, 1), groups=2, w_bits=4),
    ConvCase(2, 64, (5, 6), 24, (5, 5), padding=(8, 8), dilation=(4, 4), channels_last=True),
]


@pytest.mark.parametrize("case", AMX_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_qconv2d_amx_chunks_match_reference(device, case, threads, restore_threads):
    # 1 thread: every task holds several output rows (the block path of stride-1 layers);
    # 2 threads: the split schedules
    torch.set_num_threads(threads)
    inp = _conv_inputs(case)
    want = ref.qconv2d_ref(*inp.args, **inp.kwargs)
    _assert_equal(oq.qconv2d(*inp.to(device), **inp.kwargs), want, f"{case} {threads} threads")


def test_qconv2d_extreme_codes(device):
    # the largest accumulator magnitudes: 255 * -128 * IC * KH * KW (about -4e8 < 2**31),
    # beyond 2**24, so the int -> float32 conversion rounds; zero points at both ends
    n, c, k, oc = 1, 100, 7, 20
    w_codes = torch.full((oc, c, k, k), -128, dtype=torch.int8)
    w_codes[1::2] = 127
    w_codes[3, :, 0, 0] = 0
    w_packed = oq.pack_conv_weight(w_codes, 8)
    w_scale = torch.rand(oc) * 0.01 + 1e-3
    for zp, x in ((0, torch.full((n, c, 9, 8), 255, dtype=torch.uint8)),
                  (255, torch.zeros((n, c, 9, 8), dtype=torch.uint8)),
                  (-128, torch.full((n, c, 9, 8), 127, dtype=torch.int8)),
                  (127, torch.full((n, c, 9, 8), -128, dtype=torch.int8))):
        args = (x, torch.tensor(0.5), torch.tensor(zp), w_packed, w_scale, torch.randn(oc))
        kw = dict(w_bits=8, padding=1)
        want = ref.qconv2d_ref(*args, **kw)
        assert want.abs().max() > 2 ** 24 * 0.5 * 1e-3
        out = oq.qconv2d(*(a.to(device) for a in args), **kw)
        _assert_equal(out, want, f"zp={zp}")


def test_qconv2d_noncontiguous_arguments(device):
    case = HAND_CASES[5]
    inp = _conv_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.to(device)
    # every tensor argument as a strided view of a larger tensor
    x_nc = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    assert not x_nc.is_contiguous() and not x_nc.is_contiguous(memory_format=torch.channels_last)
    w_nc = torch.stack([w_packed, torch.ones_like(w_packed)], dim=0)[0].transpose(5, 6) \
        .contiguous().transpose(5, 6)
    assert not w_nc.is_contiguous()
    ws_nc = torch.stack([w_scale, -w_scale], dim=1)[:, 0]
    b_nc = torch.stack([bias, bias + 1], dim=1)[:, 0]
    xs_nc = torch.stack([x_scale.reshape(()), -x_scale.reshape(())])[0]
    want = ref.qconv2d_ref(*inp.args, **inp.kwargs)
    out = oq.qconv2d(x_nc, xs_nc, x_zp, w_nc, ws_nc, b_nc, **inp.kwargs)
    _assert_equal(out, want, "strided arguments")
    assert out.is_contiguous()


def test_qconv2d_empty_batch(device):
    inp = _conv_inputs(HAND_CASES[1])
    x, *rest = inp.to(device)
    x0 = x[:0]
    out = oq.qconv2d(x0, *rest, **inp.kwargs)
    oh, ow = HAND_CASES[1].out_hw()
    assert out.shape == (0, HAND_CASES[1].oc, oh, ow) and out.dtype == torch.float32


def test_qconv2d_threads_agree(restore_threads):
    inp = _conv_inputs(HAND_CASES[6])
    torch.set_num_threads(1)
    one = oq.qconv2d(*inp.args, **inp.kwargs)
    torch.set_num_threads(2)
    two = oq.qconv2d(*inp.args, **inp.kwargs)
    assert torch.equal(one, two)


def test_qconv2d_pair_arguments_normalized():
    case = ConvCase(1, 4, (7, 8), 5, (3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    inp = _conv_inputs(case)
    want = oq.qconv2d(*inp.args, **inp.kwargs)
    kw = dict(inp.kwargs, stride=2, padding=[1], dilation=(1, 1))
    assert torch.equal(oq.qconv2d(*inp.args, **kw), want)
    with pytest.raises(ValueError, match=r"qconv2d: stride expected an int or a pair"):
        oq.qconv2d(*inp.args, **dict(inp.kwargs, stride=(1, 2, 3)))
    with pytest.raises(TypeError, match=r"qconv2d: padding expected an int or a pair"):
        oq.qconv2d(*inp.args, **dict(inp.kwargs, padding=1.0))


# ------------------------------------------------------------------ qlinear

@dataclass(frozen=True)
class LinearCase:
    x_shape: Tuple[int, ...]
    oc: int
    w_bits: int = 8
    x_kind: str = "float"
    qrange: Pair = (0, 255)
    bias: bool = False
    relu: bool = False

    def __str__(self):
        return (f"x{'x'.join(map(str, self.x_shape))}-oc{self.oc}-w{self.w_bits}-{self.x_kind}"
                f"{self.qrange[0]}_{self.qrange[1]}{'-b' if self.bias else ''}"
                f"{'-relu' if self.relu else ''}")


LINEAR_CASES = [
    LinearCase((1, 1), 1),
    LinearCase((5, 3), 5, w_bits=4, qrange=(0, 15), bias=True),
    LinearCase((33, 17), 17, x_kind="uint8", relu=True),
    LinearCase((2, 3, 70), 40, w_bits=4, qrange=(-8, 7), bias=True, relu=True),
    LinearCase((7, 64), 16, x_kind="int8", qrange=(-128, 127), bias=True),
    LinearCase((4, 130), 33, qrange=(-128, 127), relu=True),
    LinearCase((11,), 9, w_bits=4, x_kind="uint8", qrange=(0, 15), bias=True),
    LinearCase((3, 1, 2, 9), 31, x_kind="int8", qrange=(-8, 7)),
    LinearCase((64, 96), 48, w_bits=4, bias=True),
    LinearCase((17, 5), 65, w_bits=8, qrange=(0, 15), bias=True, relu=True),
]


def _linear_inputs(case: LinearCase, salt: int = 0):
    i = LINEAR_CASES.index(case) + salt if case in LINEAR_CASES else salt
    zp, x_scale, x_zp = _scalars(case.qrange, None, i)
    x = _activations(case.x_shape, case.x_kind, case.qrange, zp, x_scale)
    w_codes = _weights((case.oc, case.x_shape[-1]), case.w_bits)
    w_packed = oq.pack_linear_weight(w_codes, case.w_bits)
    w_scale = (torch.rand(case.oc) * 0.05 + 0.001).to(torch.float32)
    bias = torch.randn(case.oc) if case.bias else None
    kwargs = dict(w_bits=case.w_bits, relu=case.relu)
    if case.x_kind == "float":
        kwargs.update(x_quant_min=case.qrange[0], x_quant_max=case.qrange[1])
    return ConvInputs((x, x_scale, x_zp, w_packed, w_scale, bias), kwargs, w_codes)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_qlinear_matches_reference(device, case):
    inp = _linear_inputs(case)
    want = ref.qlinear_ref(*inp.args, **inp.kwargs)
    out = oq.qlinear(*inp.to(device), **inp.kwargs)
    assert out.is_contiguous() and out.device.type == torch.device(device).type
    _assert_equal(out, want, str(case))


@pytest.mark.parametrize("case", LINEAR_CASES[1:4], ids=str)
def test_qlinear_is_qconv2d_1x1(case):
    inp = _linear_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    ic = x.shape[-1]
    x4 = x.reshape(-1, ic, 1, 1)
    conv = oq.qconv2d(x4, x_scale, x_zp, oq.pack_conv_weight(inp.w_codes[:, :, None, None],
                                                             case.w_bits),
                      w_scale, bias, **inp.kwargs)
    out = oq.qlinear(*inp.args, **inp.kwargs)
    assert torch.equal(out.reshape(-1, case.oc), conv.reshape(-1, case.oc))


def test_qlinear_noncontiguous_and_empty(device):
    inp = _linear_inputs(LINEAR_CASES[3])
    x, *rest = inp.to(device)
    want = ref.qlinear_ref(*inp.args, **inp.kwargs)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous()
    _assert_equal(oq.qlinear(x_t, *rest, **inp.kwargs), want, "transposed x")
    out = oq.qlinear(x[:0], *rest, **inp.kwargs)
    assert out.shape == (0, *x.shape[1:-1], LINEAR_CASES[3].oc)


# ------------------------------------------------------------------ vs F.conv2d / F.linear

def _check_close_to_float(out, exact_no_bias, bias, abs_terms, what):
    """out (float32) vs a float64 value; the op rounds float(acc - zp * wsum) (2**-24
    relative), x_scale * w_scale, their product and the bias add once each: 4 roundings of
    at most |conv| + |bias|. Allow 8, plus the float64 reference's own summation error."""
    want = exact_no_bias + (0 if bias is None else bias)
    mag = exact_no_bias.abs() + (0 if bias is None else bias.abs())
    tol = 8 * 2.0 ** -24 * mag + 2.0 ** -45 * abs_terms + 1e-30
    got = out.detach().cpu().to(torch.float64)
    err = (got - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: got {got[bad][:5].tolist()} expected "
                           f"{want[bad][:5].tolist()} (tolerance {tol[bad][:5].tolist()})")
    # torch.allclose in the same spirit, with the largest per-element tolerance
    assert torch.allclose(got, want, rtol=0, atol=float(tol.max()))


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.x_kind == "float"][:8], ids=str)
def test_qconv2d_matches_float_conv(plain_device, case):
    case = replace(case, relu=False)
    inp = _conv_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    xd, wd = ref.qconv_dequantized_inputs(x, x_scale, x_zp, inp.w_codes, w_scale,
                                          x_quant_min=case.qrange[0],
                                          x_quant_max=case.qrange[1])
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
              groups=case.groups)
    # padding with a real 0 is padding with the code x_zero_point
    conv = F.conv2d(xd, wd, None, **kw)
    abs_terms = F.conv2d(xd.abs(), wd.abs(), None, **kw)
    out = oq.qconv2d(*inp.to(plain_device), **inp.kwargs)
    b = None if bias is None else bias.to(torch.float64).reshape(1, -1, 1, 1)
    _check_close_to_float(out, conv, b, abs_terms, str(case))


@pytest.mark.parametrize("case", LINEAR_CASES[1:6], ids=str)
def test_qlinear_matches_float_linear(plain_device, case):
    case = replace(case, relu=False)
    inp = _linear_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    lo, hi = case.qrange if case.x_kind == "float" else (-128, 255)
    xd, wd = ref.qconv_dequantized_inputs(x, x_scale, x_zp, inp.w_codes, w_scale,
                                          x_quant_min=lo, x_quant_max=hi)
    lin = F.linear(xd, wd)
    out = oq.qlinear(*inp.to(plain_device), **inp.kwargs)
    b = None if bias is None else bias.to(torch.float64)
    _check_close_to_float(out, lin, b, F.linear(xd.abs(), wd.abs()), str(case))


# ------------------------------------------------------------------ fused epilogue

@dataclass(frozen=True)
class Epi:
    """The epilogue arguments of one call (qconv_args.h): a residual in some layout, relu
    (None: the case's own), clamp_max, and the output code range (None: float output)."""
    residual: Optional[str] = None   # None, "contiguous", "channels_last", "strided"
    relu: Optional[bool] = None
    clamp_max: Optional[float] = None
    codes: Optional[Pair] = None

    def __str__(self):
        return (f"res-{self.residual}-relu{self.relu}-clamp{self.clamp_max}-"
                f"{'float' if self.codes is None else f'codes{self.codes[0]}_{self.codes[1]}'}")


EPI_MODES = [
    Epi("contiguous"),                                          # float + residual
    Epi("channels_last", relu=True, clamp_max=6.0),             # ReLU6 after a residual add
    Epi(None, relu=True, clamp_max=6.0),                        # ReLU6
    Epi(None, codes=(0, 255)),                                  # uint8 codes
    Epi("strided", relu=True, codes=(0, 255)),                  # residual copied first
    Epi("channels_last", relu=False, codes=(-128, 127)),        # int8 codes
    Epi(None, relu=True, clamp_max=6.0, codes=(0, 15)),
    Epi("contiguous", relu=False, clamp_max=-0.25, codes=(-8, 7)),  # a clamp without relu
]

# groups 1/2/depthwise, strides, dilation, int4 and int8 weights, float / uint8 / int8 input,
# NCHW and channels_last input
EPI_CASES = [HAND_CASES[1], HAND_CASES[2], HAND_CASES[3], HAND_CASES[5], HAND_CASES[9],
             HAND_CASES[13], AMX_CASES[4], AMX_CASES[9], AMX_CASES[11]]


def _residual(shape, layout, magnitude):
    r = torch.randn(shape) * magnitude
    if layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        r = torch.stack([r, torch.full_like(r, float("nan"))], dim=-1)[..., 0]
        assert not r.is_contiguous() and not r.is_contiguous(memory_format=torch.channels_last)
    return r


def _out_grid(values, qrange):
    """out_scale / out_zero_point that map the values' range onto slightly less than qrange,
    so both ends clamp (a float32 scale, an int64 zero point inside the code domain)."""
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 1e-3)
    scale = torch.tensor(span / (qrange[1] - qrange[0]) * 0.9, dtype=torch.float32)
    zp = qrange[0] + round(-lo / float(scale)) - 1
    domain = (-128, 127) if qrange[0] < 0 else (0, 255)
    return scale, torch.tensor(min(max(zp, domain[0]), domain[1]))


def _epilogue_kwargs(base_kwargs, epi, out_shape, base_out, relu_default, ref_fn, args):
    """The keyword arguments of a fused call: base_kwargs plus the epilogue of `epi`, with a
    residual of about the output's magnitude and an output grid fitted to the values."""
    kw = dict(base_kwargs, relu=relu_default if epi.relu is None else epi.relu)
    if epi.residual is not None:
        kw["residual"] = _residual(out_shape, epi.residual, float(base_out.abs().mean()) + 0.1)
    if epi.clamp_max is not None:
        kw["clamp_max"] = epi.clamp_max
    if epi.codes is not None:
        values = ref_fn(*args, **kw)
        kw["out_scale"], kw["out_zero_point"] = _out_grid(values, epi.codes)
        kw["out_quant_min"], kw["out_quant_max"] = epi.codes
    return kw


def _on(kw, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _float_only(kw):
    return {k: v for k, v in kw.items()
            if k not in ("out_scale", "out_zero_point", "out_quant_min", "out_quant_max")}


def _assert_codes(got, want, epi, what):
    dtype = torch.int8 if epi.codes[0] < 0 else torch.uint8
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(want.shape), what
    got = got.cpu().to(torch.int64)
    assert got.min() >= epi.codes[0] and got.max() <= epi.codes[1], what
    if not torch.equal(got, want.to(torch.int64)):
        bad = (got != want.to(torch.int64)).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {want.numel()} codes differ; first at "
                             f"{idx}: got {got[idx].item()}, expected {want[idx].item()}")


def _fused_conv(case, epi, device):
    """(fused output, the reference, the unfused float output of the op, kwargs)."""
    inp = _conv_inputs(case)
    oh, ow = case.out_hw()
    base = ref.qconv2d_ref(*inp.args, **dict(inp.kwargs, relu=False))
    kw = _epilogue_kwargs(inp.kwargs, epi, (case.n, case.oc, oh, ow), base, case.relu,
                          ref.qconv2d_ref, inp.args)
    want = ref.qconv2d_ref(*inp.args, **kw)
    got = oq.qconv2d(*inp.to(device), **_on(kw, device))
    unfused = oq.qconv2d(*inp.to(device), **_on(_float_only(kw), device))
    return got, want, unfused, kw


@pytest.mark.parametrize("epi", EPI_MODES, ids=str)
@pytest.mark.parametrize("case", EPI_CASES, ids=str)
def test_qconv2d_epilogue_matches_reference(device, case, epi):
    got, want, unfused, kw = _fused_conv(case, epi, device)
    what = f"{case} {epi}"
    assert got.device.type == torch.device(device).type
    if epi.codes is None:
        fmt = _expected_format(_conv_inputs(case).args[0])
        assert got.is_contiguous(memory_format=fmt), f"{what}: strides {got.stride()}"
        _assert_equal(got, want, what)
        return
    # codes: channels_last whatever x's layout, equal to the reference's codes and, bit for
    # bit, to quantizing the op's own float output (the fused graph is the unfused one)
    assert got.is_contiguous(memory_format=torch.channels_last), f"{what}: {got.stride()}"
    _assert_codes(got, want, epi, what)
    requantized = ref.quantize_output_ref(unfused, kw["out_scale"], kw["out_zero_point"],
                                          out_quant_min=epi.codes[0],
                                          out_quant_max=epi.codes[1])
    _assert_codes(got, requantized, epi, what + " vs the unfused op")
    # the grid was fitted so that both clamps and several codes in between occur
    codes = got.cpu().to(torch.int64)
    assert (codes == epi.codes[1]).any() and codes.unique().numel() > 2, what


@pytest.mark.parametrize("case", [HAND_CASES[1], HAND_CASES[3], HAND_CASES[6]], ids=str)
def test_qconv2d_epilogue_matches_float64(plain_device, case):
    # independent of the int64 reference: F.conv2d in float64 on the dequantized tensors, the
    # residual add, relu and clamp in float64, and the codes of that result computed in float64
    # within one code (the op rounds in float32)
    case = replace(case, relu=False)
    inp = _conv_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    lo, hi = case.qrange if case.x_kind == "float" else (-128, 255)
    xd, wd = ref.qconv_dequantized_inputs(x, x_scale, x_zp, inp.w_codes, w_scale,
                                          x_quant_min=lo, x_quant_max=hi)
    ckw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
               groups=case.groups)
    conv = F.conv2d(xd, wd, None, **ckw)
    abs_terms = F.conv2d(xd.abs(), wd.abs(), None, **ckw)
    b = 0 if bias is None else bias.to(torch.float64).reshape(1, -1, 1, 1)
    residual = _residual(conv.shape, "channels_last", float(conv.abs().mean()))
    pre = conv + b + residual.to(torch.float64)
    top = float(torch.tensor(float(pre.max()) / 2, dtype=torch.float32))  # a float32 value
    kw = dict(inp.kwargs, residual=residual, relu=True, clamp_max=top)
    out = oq.qconv2d(*inp.to(plain_device), **_on(kw, plain_device)).cpu().to(torch.float64)
    exact = pre.clamp(0, top)
    # 4 roundings of the conv and bias terms (as _check_close_to_float) plus the residual add
    mag = conv.abs() + (b.abs() if bias is not None else 0) + residual.abs().to(torch.float64)
    tol = 8 * 2.0 ** -24 * mag + 2.0 ** -45 * abs_terms + 1e-30
    assert ((out - exact).abs() <= tol).all(), case
    assert (exact == 0).any() and (exact == top).any()   # relu and clamp both mattered
    scale, zp = _out_grid(exact, (0, 255))
    codes = oq.qconv2d(*inp.to(plain_device),
                       **_on(dict(kw, out_scale=scale, out_zero_point=zp), plain_device)).cpu()
    codes64 = (torch.round(exact / float(scale)) + int(zp)).clamp(0, 255)   # in float64
    assert (codes.to(torch.int64) - codes64.to(torch.int64)).abs().max() <= 1, case


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_qconv2d_chain_codes_equal_unfused_chain(device, signed):
    # producer conv (residual, relu) writing the consumer's input codes, consumer conv (groups,
    # stride) reading them, then a qlinear head reading the consumer's codes: equal to the
    # chain of float outputs that each consumer quantizes itself
    qrange = (-128, 127) if signed else (0, 255)
    prod = _conv_inputs(ConvCase(2, 8, (11, 10), 12, (3, 3), padding=(1, 1), bias=True,
                                 relu=True, channels_last=False))
    cons_case = ConvCase(2, 12, (11, 10), 6, (3, 3), stride=(2, 2), padding=(1, 1), groups=3,
                         w_bits=4, bias=True)
    cons = _conv_inputs(cons_case, salt=1)
    residual = torch.randn(2, 12, 11, 10)
    pkw = dict(prod.kwargs, residual=residual)
    y = oq.qconv2d(*prod.to(device), **_on(pkw, device))
    s2, z2 = _out_grid(y.cpu(), qrange)
    ckw = dict(cons.kwargs, x_quant_min=qrange[0], x_quant_max=qrange[1])
    _, _, _, cw, cws, cb = cons.to(device)
    unfused = oq.qconv2d(y, s2.to(device), z2.to(device), cw, cws, cb, **ckw)
    y_codes = oq.qconv2d(*prod.to(device), **_on(dict(pkw, out_scale=s2, out_zero_point=z2,
                                                      out_quant_min=qrange[0],
                                                      out_quant_max=qrange[1]), device))
    assert y_codes.dtype == (torch.int8 if signed else torch.uint8)
    fused = oq.qconv2d(y_codes, s2.to(device), z2.to(device), cw, cws, cb, **ckw)
    _assert_equal(fused, unfused.cpu(), "consumer of codes vs consumer of floats")
    # the consumer's codes into a qlinear over the channels (NHWC rows)
    s3, z3 = _out_grid(unfused.cpu(), qrange)
    lin = _linear_inputs(LinearCase((1, 6), 10, bias=True), salt=2)
    _, _, _, lw, lws, lb = lin.to(device)
    z_codes = oq.qconv2d(y_codes, s2.to(device), z2.to(device), cw, cws, cb,
                         **_on(dict(ckw, out_scale=s3, out_zero_point=z3,
                                    out_quant_min=qrange[0], out_quant_max=qrange[1]), device))
    rows = z_codes.permute(0, 2, 3, 1)           # NHWC: a view, channels innermost
    assert rows.is_contiguous()
    head = oq.qlinear(rows, s3.to(device), z3.to(device), lw, lws, lb, w_bits=8)
    head_unfused = oq.qlinear(unfused.permute(0, 2, 3, 1), s3.to(device), z3.to(device), lw,
                              lws, lb, w_bits=8, x_quant_min=qrange[0], x_quant_max=qrange[1])
    _assert_equal(head, head_unfused.cpu(), "qlinear on codes vs on floats")


LINEAR_EPI_CASES = [LINEAR_CASES[1], LINEAR_CASES[3], LINEAR_CASES[4], LINEAR_CASES[9]]


@pytest.mark.parametrize("epi", [e for e in EPI_MODES if e.residual != "channels_last"] +
                         [Epi("transposed", relu=True, clamp_max=6.0, codes=(0, 255))],
                         ids=str)
@pytest.mark.parametrize("case", LINEAR_EPI_CASES, ids=str)
def test_qlinear_epilogue_matches_reference(device, case, epi):
    inp = _linear_inputs(case)
    out_shape = (*case.x_shape[:-1], case.oc)
    base = ref.qlinear_ref(*inp.args, **dict(inp.kwargs, relu=False))
    layout = epi.residual
    epi_made = replace(epi, residual=None if layout is None else "contiguous")
    kw = _epilogue_kwargs(inp.kwargs, epi_made, out_shape, base, case.relu, ref.qlinear_ref,
                          inp.args)
    if layout == "strided":
        kw["residual"] = torch.stack([kw["residual"], -kw["residual"]], dim=-1)[..., 0]
    elif layout == "transposed" and len(out_shape) >= 2:
        kw["residual"] = kw["residual"].transpose(0, -1).contiguous().transpose(0, -1)
    want = ref.qlinear_ref(*inp.args, **kw)
    got = oq.qlinear(*inp.to(device), **_on(kw, device))
    assert got.is_contiguous()
    what = f"{case} {epi}"
    if epi.codes is None:
        _assert_equal(got, want, what)
        return
    _assert_codes(got, want, epi, what)
    unfused = oq.qlinear(*inp.to(device), **_on(_float_only(kw), device))
    requantized = ref.quantize_output_ref(unfused, kw["out_scale"], kw["out_zero_point"],
                                          out_quant_min=epi.codes[0],
                                          out_quant_max=epi.codes[1])
    _assert_codes(got, requantized, epi, what + " vs the unfused op")


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
def test_epilogue_nan_and_inf(device, op):
    # NaN in the residual stays NaN through relu and the clamp (as torch.relu / torch.clamp)
    # and becomes code 0; +-inf saturates: relu6 gives 6 and 0, the codes hit their bounds
    tensors, kw = _build(op, {}, {})
    shape = _call(op, tensors, kw, "meta").shape
    residual = torch.zeros(shape)
    idx = [(0,) * (len(shape) - 1) + (i,) for i in range(3)]
    for i, v in zip(idx, (float("nan"), float("inf"), -float("inf"))):
        residual[i] = v
    ref_fn = ref.qconv2d_ref if op == "qconv2d" else ref.qlinear_ref
    kw = dict(kw, relu=True, clamp_max=6.0, residual=residual)
    got = _call(op, tensors, _on(kw, device), device).cpu()
    assert got[idx[0]].isnan() and got[idx[1]] == 6.0 and got[idx[2]] == 0.0
    torch.testing.assert_close(got, ref_fn(*[tensors[k] for k in _TENSORS], **kw), rtol=0,
                               atol=0, equal_nan=True)
    kw = dict(kw, relu=False, clamp_max=None, out_scale=torch.tensor(0.05),
              out_zero_point=torch.tensor(-3), out_quant_min=-100, out_quant_max=90)
    codes = _call(op, tensors, _on(kw, device), device).cpu()
    assert codes.dtype == torch.int8 and [int(codes[i]) for i in idx] == [0, 90, -100]
    want = ref_fn(*[tensors[k] for k in _TENSORS], **kw)
    assert torch.equal(codes, want)


# ------------------------------------------------------------------ SIMD paths: products, tails

def _saturating_weights(shape, bits):
    """Weight codes whose adjacent input channels pair up as (hi, hi), (lo, lo) and (lo, hi):
    against input code 255 a u8 x s8 pair sum in int16 (vpmaddubsw) would saturate on the first
    two (255 * 127 * 2 > 32767, 255 * -128 * 2 < -32768)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    pattern = torch.tensor([hi, hi, lo, lo, lo, hi, hi, lo])
    ic = shape[1]
    w = pattern.repeat(ic // len(pattern) + 1)[:ic].reshape(1, ic, *([1] * (len(shape) - 2)))
    w = w.expand(shape).clone()
    w[1::3] = -w[1::3].clamp(min=lo + 1)       # other channels: the signs swapped
    w[2::5] = torch.randint(lo, hi + 1, w[2::5].shape)
    w[3], w[4] = hi, lo     # every pair sum at its extreme: consecutive k-steps add up
    return w.to(torch.int8)


@pytest.mark.parametrize("xmax", [255, 127, 15], ids=["codes255", "float0_127", "float0_15"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("ic,k", [(64, 3), (1000, 3), (8191, 1)], ids=["ic64", "ic1000", "ic8191"])
def test_qconv2d_products_do_not_saturate(capability, bits, ic, k, xmax):
    # input codes mostly at their maximum (zero point 0: nothing centred away) against weight
    # pairs at the code extremes; K up to 9000 (long int32 reductions) and a tail block
    # (8191 = 4 * 2047 + 3). The code ranges decide how many pair sums the AVX2 kernel may add
    # in int16 (none for 255 x int8, one for 127 x int8, eight for 255 x int4 or 15 x int8,
    # qconv2d_cpu.cpp int16_steps): one more would overflow here.
    oc, hw = 19, (5, 6)
    codes = torch.where(torch.rand((1, ic) + hw) < 0.9, xmax,
                        torch.randint(0, xmax + 1, (1, ic) + hw))
    kw = dict(w_bits=bits, padding=k // 2)
    if xmax == 255:
        x = codes.to(torch.uint8)
    else:   # float input on the code grid (a power-of-two scale: exact)
        x = codes.to(torch.float32) * 0.0625
        kw.update(x_quant_min=0, x_quant_max=xmax)
    x = x.contiguous(memory_format=torch.channels_last)
    w_codes = _saturating_weights((oc, ic, k, k), bits)
    args = (x, torch.tensor(0.0625), torch.tensor(0), oq.pack_conv_weight(w_codes, bits),
            torch.rand(oc) * 1e-3 + 1e-4, torch.randn(oc))
    want = ref.qconv2d_ref(*args, **kw)
    _assert_equal(oq.qconv2d(*args, **kw), want, f"{capability} ic={ic} bits={bits}")
    # the same products through qlinear (one row of pixels)
    xl = x.permute(0, 2, 3, 1).reshape(-1, ic)
    wl = w_codes[:, :, k // 2, k // 2].contiguous()
    largs = (xl, args[1], args[2], oq.pack_linear_weight(wl, bits), args[4], args[5])
    lkw = {key: v for key, v in kw.items() if key != "padding"}
    _assert_equal(oq.qlinear(*largs, **lkw), ref.qlinear_ref(*largs, **lkw),
                  f"qlinear {capability} ic={ic} bits={bits}")


_TAIL_EPIS = [Epi(None), Epi(None, relu=True, codes=(0, 255)),
              Epi("channels_last", relu=True, clamp_max=6.0, codes=(-128, 127))]


@pytest.mark.parametrize("epi", _TAIL_EPIS, ids=str)
@pytest.mark.parametrize("n", [1, 9], ids=["b1", "b9"])   # both schedules of qconv2d_cpu.cpp
def test_qconv2d_tails_every_path(capability, restore_threads, n, epi):
    # output widths 1..9 (every remainder of a pixel tile), output channels around the 8- and
    # 16-channel blocks, odd input channels (partial 4-channel blocks), both memory formats
    torch.set_num_threads(2)
    for i, (ow, oc, ic) in enumerate([(1, 1, 1), (2, 7, 3), (3, 8, 5), (4, 9, 6), (5, 15, 7),
                                      (6, 16, 9), (7, 17, 2), (8, 24, 11), (9, 33, 13)]):
        case = ConvCase(n, ic, (3, ow), oc, (3, 3), padding=(1, 1), bias=i % 2 == 0,
                        w_bits=(8, 4)[i % 2], x_kind=("float", "uint8")[i % 3 == 2],
                        channels_last=i % 2 == 1, relu=i % 4 == 1)
        inp = _conv_inputs(case, salt=i)
        base = ref.qconv2d_ref(*inp.args, **dict(inp.kwargs, relu=False))
        kw = _epilogue_kwargs(inp.kwargs, epi, (n, oc, 3, ow), base, case.relu,
                              ref.qconv2d_ref, inp.args)
        want = ref.qconv2d_ref(*inp.args, **kw)
        got = oq.qconv2d(*inp.args, **kw)
        what = f"{capability} {case} {epi}"
        if epi.codes is None:
            _assert_equal(got, want, what)
        else:
            _assert_codes(got, want, epi, what)


@pytest.mark.parametrize("epi", [Epi(None), Epi("channels_last", relu=True, clamp_max=6.0),
                                 Epi(None, relu=True, codes=(0, 255))], ids=str)
@pytest.mark.parametrize("n", [1, 9], ids=["b1", "b9"])   # both schedules
def test_qconv2d_depthwise_every_path(capability, restore_threads, n, epi):
    # groups == channels (the depthwise kernels: AVX2 32- and 8-channel blocks, AVX-512 64- and
    # 16-channel blocks, masked tails): channel counts around the blocks, 3x3 and 5x5, stride 1
    # and 2, dilation, int8 and int4, float and code input, both memory formats
    torch.set_num_threads(2)
    for i, (c, k, stride, dil) in enumerate([(8, 3, 1, 1), (19, 3, 2, 1), (32, 5, 1, 1),
                                             (45, 3, 1, 2), (96, 5, 2, 1), (33, 3, 2, 1),
                                             (130, 3, 1, 1)]):
        hw = (7 + i, 6 + 2 * i)
        pad = (k // 2) * dil
        case = ConvCase(n, c, hw, c, (k, k), stride=(stride, stride), padding=(pad, pad),
                        dilation=(dil, dil), groups=c, w_bits=(8, 4)[i % 2],
                        x_kind=("float", "uint8", "int8")[i % 3],
                        qrange=((0, 255), (0, 255), (-128, 127))[i % 3], bias=i % 2 == 0,
                        channels_last=i % 3 != 1)
        inp = _conv_inputs(case, salt=i)
        oh, ow = case.out_hw()
        base = ref.qconv2d_ref(*inp.args, **dict(inp.kwargs, relu=False))
        kw = _epilogue_kwargs(inp.kwargs, epi, (n, c, oh, ow), base, case.relu,
                              ref.qconv2d_ref, inp.args)
        want = ref.qconv2d_ref(*inp.args, **kw)
        got = oq.qconv2d(*inp.args, **kw)
        what = f"{capability} {case} {epi}"
        if epi.codes is None:
            _assert_equal(got, want, what)
        else:
            _assert_codes(got, want, epi, what)


def test_qconv2d_epilogue_all_capabilities_agree(use_capability):
    # every CPU path, back to back, gives the same codes and the same floats
    from conftest import supported_capabilities
    for epi in (EPI_MODES[1], EPI_MODES[4], EPI_MODES[5]):
        outs = []
        for cap in supported_capabilities():
            use_capability(cap)
            torch.manual_seed(5)   # the same inputs on every path
            outs.append(_fused_conv(HAND_CASES[5], epi, "cpu")[0])
        for o in outs[1:]:
            assert o.dtype == outs[0].dtype and torch.equal(o, outs[0]), epi


def test_qconv2d_epilogue_threads_and_schedules_agree(restore_threads):
    # 6 images: one thread takes the per-image schedule (N >= 4 threads), two threads the
    # split one; both give the reference's codes
    case = ConvCase(6, 20, (6, 7), 40, (3, 3), padding=(1, 1), bias=True, channels_last=True)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(11)   # the same inputs for both
        got, want, _, _ = _fused_conv(case, EPI_MODES[4], "cpu")
        _assert_codes(got, want, EPI_MODES[4], f"threads={threads}")
        outs.append(got)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ weight layout

def test_pack_conv_weight_golden_bytes(plain_device):
    # OC=2, IC=3, a 1x2 kernel: w[o, c, 0, kw]
    codes = torch.tensor([[[[1, 4]], [[-2, 5]], [[3, -6]]],
                          [[[-7, -8]], [[0, 2]], [[7, -1]]]], dtype=torch.int8,
                         device=plain_device)
    assert codes.shape == (2, 3, 1, 2)
    w8 = oq.pack_conv_weight(codes, 8)
    assert w8.shape == (1, 1, 1, 2, 1, 16, 4) and w8.dtype == torch.int8
    assert w8.device == codes.device
    rows8 = {0: [[1, -2, 3, 0], [-7, 0, 7, 0]], 1: [[4, 5, -6, 0], [-8, 2, -1, 0]]}
    for kw, rows in rows8.items():
        assert w8[0, 0, 0, kw, 0, :2].tolist() == rows
        assert not w8[0, 0, 0, kw, 0, 2:].any()
    w4 = oq.pack_conv_weight(codes, 4)
    assert w4.shape == (1, 1, 1, 2, 1, 16, 2) and w4.dtype == torch.uint8
    # byte k of a row: element 2k in the low nibble, 2k + 1 in the high nibble
    rows4 = {0: [[0xE1, 0x03], [0x09, 0x07]], 1: [[0x54, 0x0A], [0x28, 0x0F]]}
    for kw, rows in rows4.items():
        assert w4[0, 0, 0, kw, 0, :2].tolist() == rows
        assert not w4[0, 0, 0, kw, 0, 2:].any()
    assert w4.reshape(-1).nonzero().numel() == 8


def test_pack_conv_weight_golden_groups(plain_device):
    # groups=2, one output and two input channels per group, 1x1: one block per group
    codes = torch.tensor([[[[5]], [[-1]]], [[[-3]], [[6]]]], device=plain_device)
    w8 = oq.pack_conv_weight(codes, 8, groups=2)
    assert w8.shape == (2, 1, 1, 1, 1, 16, 4)
    assert w8[:, 0, 0, 0, 0, 0].tolist() == [[5, -1, 0, 0], [-3, 6, 0, 0]]
    w4 = oq.pack_conv_weight(codes, 4, groups=2)
    assert w4[:, 0, 0, 0, 0, 0].tolist() == [[0xF5, 0x00], [0x6D, 0x00]]
    assert w8.count_nonzero() == 4 and w4.count_nonzero() == 2


def test_pack_linear_weight_golden(plain_device):
    codes = torch.tensor([[1, -2, 3, -4, 5], [-8, 7, 0, 0, -1]], device=plain_device)
    w8 = oq.pack_linear_weight(codes, 8)
    assert w8.shape == (1, 2, 16, 4)
    assert w8[0, 0, :2].tolist() == [[1, -2, 3, -4], [-8, 7, 0, 0]]
    assert w8[0, 1, :2].tolist() == [[5, 0, 0, 0], [-1, 0, 0, 0]]
    w4 = oq.pack_linear_weight(codes, 4)
    assert w4.shape == (1, 2, 16, 2)
    assert w4[0, 0, :2].tolist() == [[0xE1, 0xC3], [0x78, 0x00]]
    assert w4[0, 1, :2].tolist() == [[0x05, 0x00], [0x0F, 0x00]]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_conv_weight_index_formula(bits):
    # qconv_args.h's formula written out element by element, two blocks in each direction
    oc, icg, kh, kw, g = 2 * 18, 5, 2, 3, 2
    codes = _weights((oc, icg, kh, kw), bits)
    w = oq.pack_conv_weight(codes, bits, groups=g)
    ocg, ocb, icb = oc // g, 2, 2
    assert w.shape == (g, ocb, kh, kw, icb, 16, 4 if bits == 8 else 2)
    w8 = w if bits == 8 else oq.unpack(w.reshape(-1), 4, w.numel() * 2).reshape(
        g, ocb, kh, kw, icb, 16, 4)   # the pack op's nibble order, read back
    c = codes.tolist()
    flat = w8.reshape(-1).tolist()
    pos = 0
    for gi, ob, y, x_, cb, j, i in itertools.product(range(g), range(ocb), range(kh), range(kw),
                                                     range(icb), range(16), range(4)):
        o, ci = ob * 16 + j, cb * 4 + i
        want = c[gi * ocg + o][ci][y][x_] if o < ocg and ci < icg else 0
        assert flat[pos] == want, (gi, ob, y, x_, cb, j, i)
        pos += 1


def test_int4_nibbles_match_pack_op():
    codes = _weights((23, 7, 3, 2), 4)
    w8 = oq.pack_conv_weight(codes, 8, groups=1)
    w4 = oq.pack_conv_weight(codes, 4, groups=1)
    # the int4 layout is the pack op applied to the int8 layout (same elements, same order)
    assert torch.equal(w4.reshape(-1), oq.pack(w8, 4))
    assert torch.equal(w8.reshape(-1), oq.pack(w8, 8).view(torch.int8))
    assert torch.equal(w4.reshape(-1), ref.pack_ref(w8, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,groups", [((1, 1, 1, 1), 1), ((17, 5, 3, 3), 1),
                                          ((6, 1, 3, 3), 6), ((12, 2, 5, 1), 3),
                                          ((48, 9, 2, 7), 2), ((33, 4, 1, 1), 1)])
def test_conv_weight_round_trip(plain_device, bits, shape, groups):
    codes = _weights(shape, bits).to(plain_device)
    w = oq.pack_conv_weight(codes, bits, groups)
    assert w.is_contiguous() and w.device == codes.device
    back = oq.unpack_conv_weight(w, bits, shape[0], shape[1])
    assert back.dtype == torch.int8 and torch.equal(back, codes)
    # any integer dtype is accepted
    assert torch.equal(oq.pack_conv_weight(codes.to(torch.int64), bits, groups), w)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("oc,ic", [(1, 1), (16, 4), (17, 5), (40, 130), (3, 64)])
def test_linear_weight_round_trip(plain_device, bits, oc, ic):
    codes = _weights((oc, ic), bits).to(plain_device)
    w = oq.pack_linear_weight(codes, bits)
    assert w.shape == (math.ceil(oc / 16), math.ceil(ic / 4), 16, 4 if bits == 8 else 2)
    assert torch.equal(oq.unpack_linear_weight(w, bits, oc, ic), codes)
    assert torch.equal(w, oq.pack_conv_weight(codes[:, :, None, None], bits).reshape(w.shape))


LAYOUT_ERRORS = [
    ("bits", ValueError, r"pack_conv_weight: bits expected 4 or 8",
     lambda: oq.pack_conv_weight(torch.zeros(2, 2, 1, 1, dtype=torch.int8), 2)),
    ("float_codes", TypeError, r"pack_conv_weight: codes expected an integer dtype",
     lambda: oq.pack_conv_weight(torch.zeros(2, 2, 1, 1), 8)),
    ("dims", ValueError, r"pack_conv_weight: codes expected 4 dimensions",
     lambda: oq.pack_conv_weight(torch.zeros(2, 2, dtype=torch.int8), 8)),
    ("int4_range_hi", ValueError, r"pack_conv_weight: codes expected values in \[-8, 7\].*8",
     lambda: oq.pack_conv_weight(torch.tensor([7, 8]).reshape(1, 2, 1, 1), 4)),
    ("int4_range_lo", ValueError, r"pack_conv_weight: codes expected values in \[-8, 7\].*-9",
     lambda: oq.pack_conv_weight(torch.tensor([-9, 0]).reshape(2, 1, 1, 1), 4)),
    ("int8_range", ValueError, r"pack_conv_weight: codes expected values in \[-128, 127\]",
     lambda: oq.pack_conv_weight(torch.tensor([128]).reshape(1, 1, 1, 1), 8)),
    ("uint8_range", ValueError, r"pack_conv_weight: codes expected values in \[-128, 127\]",
     lambda: oq.pack_conv_weight(torch.tensor([200], dtype=torch.uint8).reshape(1, 1, 1, 1),
                                 8)),
    ("groups", ValueError, r"pack_conv_weight: groups expected a positive divisor .*\(6\)",
     lambda: oq.pack_conv_weight(torch.zeros(6, 1, 1, 1, dtype=torch.int8), 8, groups=4)),
    ("groups_zero", ValueError, r"pack_conv_weight: groups",
     lambda: oq.pack_conv_weight(torch.zeros(6, 1, 1, 1, dtype=torch.int8), 8, groups=0)),
    ("unpack_dtype", TypeError, r"unpack_conv_weight: w_packed expected dtype torch.uint8",
     lambda: oq.unpack_conv_weight(torch.zeros(1, 1, 1, 1, 1, 16, 2, dtype=torch.int8), 4, 1, 1)),
    ("unpack_shape", ValueError, r"unpack_conv_weight: w_packed expected shape",
     lambda: oq.unpack_conv_weight(torch.zeros(1, 1, 1, 1, 1, 16, 2, dtype=torch.int8), 8, 1, 1)),
    ("unpack_oc", ValueError, r"unpack_conv_weight: out_channels expected",
     lambda: oq.unpack_conv_weight(torch.zeros(1, 1, 1, 1, 1, 16, 4, dtype=torch.int8), 8, 17, 1)),
    ("unpack_ic", ValueError, r"unpack_conv_weight: in_channels_per_group expected",
     lambda: oq.unpack_conv_weight(torch.zeros(1, 1, 1, 1, 1, 16, 4, dtype=torch.int8), 8, 3, 5)),
    ("unpack_bits", ValueError, r"unpack_conv_weight: bits expected 4 or 8",
     lambda: oq.unpack_conv_weight(torch.zeros(1, 1, 1, 1, 1, 16, 4, dtype=torch.int8), 2, 3, 4)),
    ("linear_dims", ValueError, r"pack_linear_weight: codes expected 2 dimensions",
     lambda: oq.pack_linear_weight(torch.zeros(2, 2, 1, 1, dtype=torch.int8), 8)),
    ("linear_range", ValueError, r"pack_linear_weight: codes expected values in \[-8, 7\]",
     lambda: oq.pack_linear_weight(torch.full((2, 2), -9), 4)),
    ("unlinear_shape", ValueError, r"unpack_linear_weight: w_packed expected shape \[OCB, ICB",
     lambda: oq.unpack_linear_weight(torch.zeros(1, 1, 1, 16, 4, dtype=torch.int8), 8, 1, 1)),
    ("unlinear_features", ValueError, r"unpack_linear_weight: in_features expected",
     lambda: oq.unpack_linear_weight(torch.zeros(1, 1, 16, 4, dtype=torch.int8), 8, 1, 9)),
]


@pytest.mark.parametrize("name,exc,match,fn", LAYOUT_ERRORS, ids=[e[0] for e in LAYOUT_ERRORS])
def test_layout_helper_errors(name, exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------ opcheck and compile

OPCHECK_CONV = [HAND_CASES[0], HAND_CASES[2], HAND_CASES[5],
                replace(HAND_CASES[4], n=1, hw=(9, 8))]


@pytest.mark.parametrize("case", OPCHECK_CONV, ids=str)
def test_opcheck_qconv2d(plain_device, case):
    inp = _conv_inputs(case)
    kw = dict(inp.kwargs, stride=list(case.stride), padding=list(case.padding),
              dilation=list(case.dilation))
    torch.library.opcheck(torch.ops.oqfl.qconv2d.default, inp.to(plain_device), kw)


@pytest.mark.parametrize("case", [LINEAR_CASES[1], LINEAR_CASES[3], LINEAR_CASES[6]], ids=str)
def test_opcheck_qlinear(plain_device, case):
    inp = _linear_inputs(case)
    torch.library.opcheck(torch.ops.oqfl.qlinear.default, inp.to(plain_device), inp.kwargs)


def test_fake_kernels_predict_outputs(plain_device):
    # shapes, dtypes and strides of the fake kernels equal the real ones (channels_last too)
    from torch._subclasses.fake_tensor import FakeTensorMode
    for case in (HAND_CASES[1], HAND_CASES[6], HAND_CASES[9]):
        inp = _conv_inputs(case)
        real = oq.qconv2d(*inp.to(plain_device), **inp.kwargs)
        with FakeTensorMode() as mode:
            fake_args = [None if a is None else mode.from_tensor(a)
                         for a in inp.to(plain_device)]
            fake = oq.qconv2d(*fake_args, **inp.kwargs)
        assert fake.shape == real.shape and fake.dtype == real.dtype
        assert fake.stride() == real.stride() and fake.device == real.device
    inp = _linear_inputs(LINEAR_CASES[3])
    real = oq.qlinear(*inp.to(plain_device), **inp.kwargs)
    meta = oq.qlinear(*[None if a is None else a.to("meta") for a in inp.args], **inp.kwargs)
    assert meta.shape == real.shape and meta.stride() == real.stride()


@pytest.mark.parametrize("epi", [EPI_MODES[0], EPI_MODES[4], EPI_MODES[5]], ids=str)
@pytest.mark.parametrize("case", [HAND_CASES[1], HAND_CASES[6]], ids=str)
def test_fake_kernels_predict_epilogue_outputs(plain_device, case, epi):
    # code output: uint8 / int8, channels_last even for an NCHW x (HAND_CASES[6])
    _, _, _, kw = _fused_conv(case, epi, "cpu")
    inp = _conv_inputs(case)
    real = oq.qconv2d(*inp.to(plain_device), **_on(kw, plain_device))
    meta = oq.qconv2d(*[None if a is None else a.to("meta") for a in inp.args],
                      **_on(kw, "meta"))
    assert meta.shape == real.shape and meta.dtype == real.dtype
    assert meta.stride() == real.stride(), (meta.stride(), real.stride())
    lin = _linear_inputs(LINEAR_CASES[3])
    lkw = dict(lin.kwargs, out_scale=torch.tensor(0.1), out_zero_point=torch.tensor(-4),
               out_quant_min=-8, out_quant_max=7, residual=torch.randn(2, 3, 40))
    real = oq.qlinear(*lin.to(plain_device), **_on(lkw, plain_device))
    meta = oq.qlinear(*[None if a is None else a.to("meta") for a in lin.args],
                      **_on(lkw, "meta"))
    assert real.dtype == meta.dtype == torch.int8
    assert meta.shape == real.shape and meta.stride() == real.stride()


def test_compile_qconv_block(plain_device):
    # a quantized conv block as inference code would write it, compiled with fullgraph
    torch._dynamo.reset()
    case = HAND_CASES[1]
    inp = _conv_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.to(plain_device)
    lin = _linear_inputs(LinearCase((1, case.oc), 10, w_bits=8, bias=True))
    _, _, _, lw, lws, lb = lin.to(plain_device)

    def block(x):
        y = oq.qconv2d(x, x_scale, x_zp, w_packed, w_scale, bias, **inp.kwargs)
        y = y.mean(dim=(2, 3))
        return oq.qlinear(y * 4.0, x_scale, torch.zeros_like(x_zp), lw, lws, lb, w_bits=8)

    eager = block(x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(eager, compiled)


# ------------------------------------------------------------------ argument errors

def _base_conv():
    case = ConvCase(2, 6, (7, 7), 6, (3, 3), padding=(1, 1), groups=2, bias=True)
    inp = _conv_inputs(case)
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    kw = dict(w_bits=8, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2, relu=False,
              x_quant_min=0, x_quant_max=255)
    return dict(x=x, x_scale=x_scale.reshape(()), x_zero_point=x_zp.reshape(()).to(torch.int64),
                w_packed=w_packed, w_scale=w_scale, bias=bias), kw


def _base_linear():
    inp = _linear_inputs(LinearCase((3, 10), 20, bias=True))
    x, x_scale, x_zp, w_packed, w_scale, bias = inp.args
    return dict(x=x, x_scale=x_scale.reshape(()), x_zero_point=x_zp.reshape(()),
                w_packed=w_packed, w_scale=w_scale, bias=bias), \
        dict(w_bits=8, relu=False, x_quant_min=0, x_quant_max=255)


_TENSORS = ("x", "x_scale", "x_zero_point", "w_packed", "w_scale", "bias")


def _call(op, tensors, kw, device):
    args = [None if tensors[k] is None else tensors[k].to(device) for k in _TENSORS]
    return getattr(torch.ops.oqfl, op)(*args, **_on(kw, device))


def _expect(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    # "<op>: <name> expected ...": the argument named as a whole word, then what was expected
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg), msg
    assert "expected" in msg, msg
    return msg


def _t(**over):
    return over


# (id, op, tensor overrides, keyword overrides, exception, argument named)
META_ERRORS = [
    ("x_float64", "both", _t(x=lambda t: t["x"].double()), {}, TypeError, "x"),
    ("x_float16", "both", _t(x=lambda t: t["x"].half()), {}, TypeError, "x"),
    ("x_int32", "both", _t(x=lambda t: t["x"].to(torch.int32)), {}, TypeError, "x"),
    ("x_3d", "qconv2d", _t(x=lambda t: t["x"][0]), {}, ValueError, "x"),
    ("x_0d", "qlinear", _t(x=lambda t: t["x"][0, 0]), {}, ValueError, "x"),
    ("x_ic0", "qlinear", _t(x=lambda t: t["x"][:, :0]), {}, ValueError, "x"),
    ("x_scale_float64", "both", _t(x_scale=lambda t: t["x_scale"].double()), {}, TypeError,
     "x_scale"),
    ("x_scale_shape2", "both", _t(x_scale=lambda t: t["x_scale"].repeat(2)), {}, ValueError,
     "x_scale"),
    ("x_scale_shape1x1", "both", _t(x_scale=lambda t: t["x_scale"].reshape(1, 1)), {},
     ValueError, "x_scale"),
    ("x_zero_point_float", "both", _t(x_zero_point=lambda t: t["x_zero_point"].float()), {},
     TypeError, "x_zero_point"),
    ("x_zero_point_uint8", "both", _t(x_zero_point=lambda t: t["x_zero_point"].to(torch.uint8)),
     {}, TypeError, "x_zero_point"),
    ("x_zero_point_shape2", "both", _t(x_zero_point=lambda t: t["x_zero_point"].repeat(2)), {},
     ValueError, "x_zero_point"),
    ("w_bits_2", "both", {}, dict(w_bits=2), ValueError, "w_bits"),
    ("w_bits_16", "both", {}, dict(w_bits=16), ValueError, "w_bits"),
    ("w_packed_uint8_for_8", "both", _t(w_packed=lambda t: t["w_packed"].view(torch.uint8)), {},
     TypeError, "w_packed"),
    ("w_packed_int8_for_4", "both", {}, dict(w_bits=4), TypeError, "w_packed"),
    ("w_packed_int32", "both", _t(w_packed=lambda t: t["w_packed"].to(torch.int32)), {},
     TypeError, "w_packed"),
    ("w_packed_int8_shape_for_4", "both",
     _t(w_packed=lambda t: t["w_packed"].view(torch.uint8)), dict(w_bits=4), ValueError,
     "w_packed"),
    ("w_packed_dims", "both", _t(w_packed=lambda t: t["w_packed"][0]), {}, ValueError,
     "w_packed"),
    ("w_packed_ocb", "both", _t(w_packed=lambda t: torch.cat([t["w_packed"]] * 2, dim=-6)
                                if t["w_packed"].dim() == 7
                                else torch.cat([t["w_packed"]] * 2, dim=0)), {},
     ValueError, "w_packed"),
    ("w_packed_icb", "both", _t(w_packed=lambda t: torch.cat([t["w_packed"]] * 2, dim=-3)), {},
     ValueError, "w_packed"),
    ("w_packed_row", "both", _t(w_packed=lambda t: t["w_packed"][..., :3].contiguous()), {},
     ValueError, "w_packed"),
    ("w_packed_kernel0", "qconv2d", _t(w_packed=lambda t: t["w_packed"][:, :, :0]), {},
     ValueError, "w_packed"),
    ("w_packed_groups", "qconv2d", _t(w_packed=lambda t: t["w_packed"][:1]), {}, ValueError,
     "w_packed"),
    ("w_scale_float64", "both", _t(w_scale=lambda t: t["w_scale"].double()), {}, TypeError,
     "w_scale"),
    ("w_scale_2d", "both", _t(w_scale=lambda t: t["w_scale"][None]), {}, ValueError,
     "w_scale"),
    ("w_scale_empty", "both", _t(w_scale=lambda t: t["w_scale"][:0], bias=None), {},
     ValueError, "w_scale"),
    ("w_scale_longer", "both",
     _t(w_scale=lambda t: t["w_scale"].repeat(6), bias=None), {}, ValueError, "w_packed"),
    ("bias_float64", "both", _t(bias=lambda t: t["bias"].double()), {}, TypeError, "bias"),
    ("bias_len", "both", _t(bias=lambda t: t["bias"][:-1]), {}, ValueError, "bias"),
    ("bias_2d", "both", _t(bias=lambda t: t["bias"][None]), {}, ValueError, "bias"),
    ("groups_0", "qconv2d", {}, dict(groups=0), ValueError, "groups"),
    ("groups_neg", "qconv2d", {}, dict(groups=-2), ValueError, "groups"),
    ("groups_not_dividing_ic", "qconv2d", {}, dict(groups=4), ValueError, "x"),
    ("groups_not_dividing_oc", "qconv2d",
     _t(w_scale=lambda t: t["w_scale"][:5], bias=lambda t: t["bias"][:5]), {}, ValueError,
     "w_scale"),
    ("groups_more_than_ic", "qconv2d", {}, dict(groups=12), ValueError, "x"),
    ("ic_mismatch", "qconv2d", _t(x=lambda t: torch.cat([t["x"]] * 3, dim=1)), {}, ValueError,
     "w_packed"),
    ("ic_mismatch", "qlinear", _t(x=lambda t: torch.cat([t["x"]] * 2, dim=-1)), {}, ValueError,
     "w_packed"),
    ("stride_0", "qconv2d", {}, dict(stride=[0, 1]), ValueError, "stride"),
    ("stride_neg", "qconv2d", {}, dict(stride=[1, -1]), ValueError, "stride"),
    ("stride_len3", "qconv2d", {}, dict(stride=[1, 1, 1]), (ValueError, RuntimeError),
     "stride"),
    ("padding_neg", "qconv2d", {}, dict(padding=[-1, 0]), ValueError, "padding"),
    ("dilation_0", "qconv2d", {}, dict(dilation=[1, 0]), ValueError, "dilation"),
    ("empty_output", "qconv2d", {}, dict(padding=[0, 0], dilation=[4, 4]), ValueError, "x"),
    ("empty_output_w", "qconv2d", _t(x=lambda t: t["x"][..., :2]), dict(padding=[1, 0]),
     ValueError, "x"),
    ("x_quant_min_eq_max", "both", {}, dict(x_quant_min=5, x_quant_max=5), ValueError,
     "x_quant_min"),
    ("x_quant_min_gt_max", "both", {}, dict(x_quant_min=10, x_quant_max=3), ValueError,
     "x_quant_min"),
    ("x_quant_max_256", "both", {}, dict(x_quant_min=0, x_quant_max=256), ValueError,
     "x_quant_max"),
    ("x_quant_min_m129", "both", {}, dict(x_quant_min=-129, x_quant_max=127), ValueError,
     "x_quant_min"),
    ("x_quant_max_128_signed", "both", {}, dict(x_quant_min=-8, x_quant_max=128), ValueError,
     "x_quant_max"),
    # the fused epilogue (check_qconv_epilogue in qconv_args.cpp)
    ("residual_float64", "both", _t(residual=lambda t: _out_like(t).double()), {}, TypeError,
     "residual"),
    ("residual_uint8", "both", _t(residual=lambda t: _out_like(t).to(torch.uint8)), {},
     TypeError, "residual"),
    ("residual_shape", "both", _t(residual=lambda t: _out_like(t)[..., :-1]), {}, ValueError,
     "residual"),
    ("residual_broadcast", "both", _t(residual=lambda t: _out_like(t)[:1]), {}, ValueError,
     "residual"),
    ("clamp_max_nan", "both", {}, dict(clamp_max=float("nan")), ValueError, "clamp_max"),
    ("clamp_max_inf", "both", {}, dict(clamp_max=float("inf")), ValueError, "clamp_max"),
    ("clamp_max_float32_overflow", "both", {}, dict(clamp_max=1e39), ValueError, "clamp_max"),
    ("clamp_max_negative_relu", "both", {}, dict(clamp_max=-1.0, relu=True), ValueError,
     "clamp_max"),
    ("out_scale_float64", "both", {}, dict(out_scale=torch.tensor(.1, dtype=torch.float64),
                                           out_zero_point=torch.tensor(0)), TypeError,
     "out_scale"),
    ("out_scale_shape2", "both", {}, dict(out_scale=torch.tensor([.1, .1]),
                                          out_zero_point=torch.tensor(0)), ValueError,
     "out_scale"),
    ("out_zero_point_missing", "both", {}, dict(out_scale=torch.tensor(.1)), ValueError,
     "out_zero_point"),
    ("out_zero_point_alone", "both", {}, dict(out_zero_point=torch.tensor(0)), ValueError,
     "out_scale"),
    ("out_zero_point_float", "both", {}, dict(out_scale=torch.tensor(.1),
                                              out_zero_point=torch.tensor(0.)), TypeError,
     "out_zero_point"),
    ("out_zero_point_shape2", "both", {}, dict(out_scale=torch.tensor(.1),
                                               out_zero_point=torch.tensor([0, 0])),
     ValueError, "out_zero_point"),
    ("out_quant_min_gt_max", "both", {}, dict(out_scale=torch.tensor(.1),
                                              out_zero_point=torch.tensor(0),
                                              out_quant_min=10, out_quant_max=3), ValueError,
     "out_quant_min"),
    ("out_quant_max_256", "both", {}, dict(out_scale=torch.tensor(.1),
                                           out_zero_point=torch.tensor(0), out_quant_max=256),
     ValueError, "out_quant_max"),
    ("out_quant_min_m129", "both", {}, dict(out_scale=torch.tensor(.1),
                                            out_zero_point=torch.tensor(0),
                                            out_quant_min=-129, out_quant_max=127),
     ValueError, "out_quant_min"),
    ("out_quant_max_128_signed", "both", {}, dict(out_scale=torch.tensor(.1),
                                                  out_zero_point=torch.tensor(0),
                                                  out_quant_min=-8, out_quant_max=128),
     ValueError, "out_quant_max"),
]


def _out_like(tensors):
    """A float32 tensor of the base call's output shape (a valid residual)."""
    if tensors["x"].dim() == 4:
        n, _, h, w = tensors["x"].shape
        return torch.randn(n, tensors["w_scale"].shape[0], h, w)   # 3x3, padding 1
    return torch.randn(*tensors["x"].shape[:-1], tensors["w_scale"].shape[0])


def _build(op, overrides, kw_over):
    tensors, kw = _base_conv() if op == "qconv2d" else _base_linear()
    kw = dict(kw, **kw_over)
    for k, v in overrides.items():
        if k in tensors:
            tensors[k] = v(tensors) if callable(v) else v
    for k, v in overrides.items():   # keyword tensors (residual) built from the others
        if k not in tensors:
            kw[k] = v(tensors) if callable(v) else v
    return tensors, kw


def _meta_params():
    out = []
    for name, op, over, kw_over, exc, arg in META_ERRORS:
        for o in ("qconv2d", "qlinear") if op == "both" else (op,):
            out.append(pytest.param(o, over, kw_over, exc, arg, id=f"{o}-{name}"))
    return out


@pytest.mark.parametrize("op,over,kw_over,exc,arg", _meta_params())
def test_bad_argument(plain_device, op, over, kw_over, exc, arg):
    tensors, kw = _build(op, over, kw_over)
    _expect(exc, arg, lambda: _call(op, tensors, kw, plain_device))


@pytest.mark.parametrize("op,over,kw_over,exc,arg", _meta_params())
def test_bad_argument_fake_kernel(op, over, kw_over, exc, arg):
    # the fake kernels (meta tensors) raise the same exception type naming the same argument
    tensors, kw = _build(op, over, kw_over)
    _expect(exc, arg, lambda: _call(op, tensors, kw, "meta"))


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
def test_valid_base_arguments_pass(plain_device, op):
    # the error tests above start from arguments that are accepted as they are
    tensors, kw = _build(op, {}, {})
    _call(op, tensors, kw, plain_device)
    _call(op, tensors, kw, "meta")


BAD_STEPS = [0.0, -0.0, -0.25, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("value", BAD_STEPS, ids=str)
def test_bad_scale_values_cpu(op, value):
    tensors, kw = _build(op, {}, {})
    bad_x = dict(tensors, x_scale=torch.tensor(value))
    _expect(ValueError, "x_scale", lambda: _call(op, bad_x, kw, "cpu"))
    w_scale = tensors["w_scale"].clone()
    w_scale[-1] = value   # the last channel only: every value is read
    bad_w = dict(tensors, w_scale=w_scale)
    _expect(ValueError, "w_scale", lambda: _call(op, bad_w, kw, "cpu"))


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("value", BAD_STEPS, ids=str)
def test_bad_out_scale_values_cpu(op, value):
    tensors, kw = _build(op, {}, dict(out_scale=torch.tensor(value),
                                      out_zero_point=torch.tensor(0)))
    _expect(ValueError, "out_scale", lambda: _call(op, tensors, kw, "cpu"))


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("qmin,qmax,bad,good", [(0, 15, [-1, 256], [0, 255]),
                                                (-8, 7, [-129, 128], [-128, 127])],
                         ids=["uint8", "int8"])
def test_out_zero_point_domain_cpu(op, qmin, qmax, bad, good):
    # the zero point lies in the output's code domain (not necessarily inside its range)
    tensors, kw = _build(op, {}, dict(out_scale=torch.tensor(0.03), out_quant_min=qmin,
                                      out_quant_max=qmax))
    for zp in bad:
        t = dict(kw, out_zero_point=torch.tensor(zp))
        _expect(ValueError, "out_zero_point", lambda: _call(op, tensors, t, "cpu"))
    for zp in good:
        t = dict(kw, out_zero_point=torch.tensor(zp, dtype=torch.int32))
        out = _call(op, tensors, t, "cpu")
        want = (ref.qconv2d_ref if op == "qconv2d" else ref.qlinear_ref)(
            *[tensors[k] for k in _TENSORS], **t)
        assert out.dtype == want.dtype and torch.equal(out, want), f"zp={zp}"


ZP_DOMAIN = [
    # (x dtype, x_quant_min, x_quant_max, bad zero points, good zero points)
    (torch.float32, 0, 15, [-1, 256], [0, 255, 100]),
    (torch.float32, -8, 7, [-129, 128], [-128, 127, 50]),
    (torch.uint8, -8, 7, [-1, 256], [0, 255]),      # code input: the range is ignored
    (torch.int8, 0, 255, [-129, 128], [-128, 127]),
]


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("dtype,qmin,qmax,bad,good", ZP_DOMAIN,
                         ids=["float_unsigned", "float_signed", "uint8", "int8"])
def test_zero_point_domain_cpu(op, dtype, qmin, qmax, bad, good):
    tensors, kw = _build(op, {}, dict(x_quant_min=qmin, x_quant_max=qmax))
    x = tensors["x"]
    tensors["x"] = x if dtype == torch.float32 else (x.abs() * 7).to(dtype)
    for zp in bad:
        t = dict(tensors, x_zero_point=torch.tensor(zp))
        _expect(ValueError, "x_zero_point", lambda: _call(op, t, kw, "cpu"))
    for zp in good:
        t = dict(tensors, x_zero_point=torch.tensor(zp, dtype=torch.int32))
        out = _call(op, t, kw, "cpu")
        want = (ref.qconv2d_ref if op == "qconv2d" else ref.qlinear_ref)(
            *[t[k] for k in _TENSORS], **kw)
        _assert_equal(out, want, f"zp={zp}")


def test_code_input_ignores_quant_range():
    # uint8 / int8 codes are taken as they are: a nonsensical x_quant range is not an error
    tensors, kw = _build("qconv2d", {}, dict(x_quant_min=7, x_quant_max=3))
    tensors["x"] = torch.randint(0, 256, tensors["x"].shape).to(torch.uint8)
    out = _call("qconv2d", tensors, kw, "cpu")
    want = ref.qconv2d_ref(*[tensors[k] for k in _TENSORS], **kw)
    _assert_equal(out, want, "uint8 codes")


# ------------------------------------------------------------------ CUDA only

@requires_cuda
@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("where", ["x_scale", "x_zero_point", "w_packed", "w_scale", "bias"])
def test_device_mismatch(op, where):
    tensors, kw = _build(op, {}, {})
    args = [None if tensors[k] is None else tensors[k].to("cpu" if k == where else "cuda")
            for k in _TENSORS]
    _expect(ValueError, where, lambda: getattr(torch.ops.oqfl, op)(*args, **kw))


@requires_cuda
@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
@pytest.mark.parametrize("what,value", [(w, v) for w in ("x_scale", "w_scale")
                                        for v in (0.0, -0.25, float("nan"), float("inf"))] +
                         [("x_zero_point", 256), ("x_zero_point", -1)], ids=str)
def test_bad_values_cuda_give_nan(op, what, value):
    # CUDA never reads them on the host: a bad w_scale[o] makes channel o NaN, a bad x_scale
    # or zero point the whole output; relu keeps the NaN
    tensors, kw = _build(op, {}, dict(relu=True))
    tensors = {k: None if v is None else v.to("cuda") for k, v in tensors.items()}
    if what == "w_scale":
        tensors["w_scale"] = tensors["w_scale"].clone()
        tensors["w_scale"][1] = value
    else:
        tensors[what] = torch.tensor(value, device="cuda")
    out = _call(op, tensors, kw, "cuda").cpu()
    chan = out.movedim(1, 0) if op == "qconv2d" else out.movedim(-1, 0)
    if what == "w_scale":
        assert chan[1].isnan().all()
        assert not chan[[0] + list(range(2, chan.shape[0]))].isnan().any()
    else:
        assert out.isnan().all()


@requires_cuda
def test_cuda_matches_cpu_large():
    # a realistic layer (ResNet-ish 3x3, 64 -> 64 channels, 56x56), channels_last, int4 weights
    case = ConvCase(4, 64, (56, 56), 64, (3, 3), padding=(1, 1), w_bits=4, qrange=(0, 15),
                    bias=True, relu=True, channels_last=True)
    inp = _conv_inputs(case)
    cpu = oq.qconv2d(*inp.args, **inp.kwargs)
    gpu = oq.qconv2d(*inp.to("cuda"), **inp.kwargs)
    assert gpu.is_contiguous(memory_format=torch.channels_last)
    _assert_equal(gpu, cpu, "cuda vs cpu")
