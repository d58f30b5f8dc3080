"""Benchmarks for the integer convolution ``oqfl::qconv2d`` against float and torch.ao int8.

ResNet 3x3 convolutions (stride 1, padding 1, IC = OC, bias, no ReLU), float32 input to float32
output on every side, at batch 32 and batch 1, with 2 threads (``torch.set_num_threads(2)`` for
this module, restored afterwards). Each group ``conv3x3-<C>ch-<H>x<W>-b<N>`` holds:

``float_conv2d``
    ``F.conv2d`` in float32 on a channels_last input and a channels_last weight (the baseline).
``torch_ao_int8``
    ``torch.backends.quantized.engine = "x86"`` (oneDNN/FBGEMM), the weight quantized per output
    channel (symmetric qint8) and prepacked once by ``torch.ops.quantized.conv2d_prepack``; timed:
    ``quantize_per_tensor(x, quint8)`` -> ``torch.ops.quantized.conv2d`` -> ``dequantize()``.
    Its output is requantized to quint8 with an output scale/zero point fixed from the exact
    output range (that is how the op works), so its result carries half an output step of error.
``oqfl_int8``
    ``torch.ops.oqfl.qconv2d`` on the float32 channels_last input (quantized inside the op with
    the same scale, zero point and range as torch.ao), int8 weights with the same codes
    and per-channel scales as torch.ao, packed once (``oqfl_ext.ops.pack_conv_weight``, or the
    layout of csrc/qconv_args.h rebuilt here while the wrapper does not exist).
``oqfl_int4``
    The same with 4-bit weights (symmetric, codes -8..7, scale max|w| / 7 per channel).

The input is ``randn + 0.5`` quantized asymmetrically (scale (max - min) / (qmax - qmin), a
non-zero zero point; on a CPU without VNNI the range is 0..127 for every path, as torch.ao's
own ``reduce_range`` qconfig does there, see ``X_QMAX``), the weight is Kaiming-normal.
Packing and prepacking are not timed.

Before the first timing of a case (once per case, cached) the paths are checked against each
other so that no ratio compares garbage: torch.ao and ours against the exact float64 convolution
of the dequantized codes, ours against torch.ao (within one output step: torch.ao's
requantization in float32 is off by up to ~0.6 steps), ours int4 against its
own exact reference, and float F.conv2d against the int8 reference (quantization noise only).

Each benchmark's extra_info carries ``ops`` (2 * N * OC * OH * OW * IC * 9), the weight bytes
of its format and the load average when it started; ``bench/report_qconv.py`` prints GOPS and
the ratios. Under ``--benchmark-disable`` (the CI smoke run) every case runs at batch 1 so that
the run stays cheap whatever the kernel's speed.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.nn import functional as F

THREADS = 2
ENGINE = "x86"
LAYERS = ((64, 56), (128, 28), (256, 14))  # (channels, height = width)
BATCHES = (32, 1)
IMPLS = ("float_conv2d", "torch_ao_int8", "oqfl_int8", "oqfl_int4")
KERNEL = 3
STRIDE, PADDING, DILATION = (1, 1), (1, 1), (1, 1)


def _cpu_has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 directly (AVX-512 VNNI or AVX-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:  # not Linux: assume the older path (the 7-bit range is exact on both)
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, torch.ao's x86 engine (FBGEMM's AVX2 path) adds u8 x s8 products in pairs into
# saturating int16, so full-range activations give wrong results (measured 8 output steps off);
# torch's own default x86 qconfig therefore quantizes activations with reduce_range (0..127).
# Every path here uses the same activation range so that all of them compute the same thing.
X_QMIN, X_QMAX = 0, (255 if _cpu_has_vnni() else 127)
CHECK_IMAGES = 2  # images of the batch compared with the float64 reference
# torch.ao requantizes its int32 result to quint8 (half a step) with float32 multipliers
# (measured up to 0.59 steps here): allow one output step against it.
AO_TOL_STEPS = 1.0

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def group_name(channels: int, size: int, batch: int) -> str:
    return f"conv3x3-{channels}ch-{size}x{size}-b{batch}"


def conv_ops(batch: int, channels: int, size: int) -> int:
    """2 * N * OC * OH * OW * IC * KH * KW (multiply and add counted apart)."""
    return 2 * batch * channels * size * size * channels * KERNEL * KERNEL


def packed_weight_bytes(out_channels: int, in_channels: int, bits: int) -> int:
    """Bytes of the blocked layout of csrc/qconv_args.h (groups 1, 3x3)."""
    blocks = math.ceil(out_channels / 16) * math.ceil(in_channels / 4) * KERNEL * KERNEL
    return blocks * 64 * bits // 8


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


@pytest.fixture(scope="module", autouse=True)
def _threads_and_engine():
    """2 threads and the x86 quantized engine for this module only."""
    threads = torch.get_num_threads()
    engine = torch.backends.quantized.engine
    torch.set_num_threads(THREADS)
    if ENGINE in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = ENGINE
    yield
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = engine


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _oqfl_skip_reason() -> Optional[str]:
    try:
        import oqfl_ext  # noqa: F401
    except Exception as e:
        return f"oqfl_ext is not usable ({f'{type(e).__name__}: {e}'.splitlines()[0][:300]})"
    if not hasattr(torch.ops.oqfl, "qconv2d"):
        return "this oqfl_ext build has no oqfl::qconv2d op (rebuild the extension)"
    try:
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("oqfl::qconv2d", "CPU")
    except Exception:
        has_cpu = False
    if not has_cpu:
        return "this oqfl_ext build has no CPU kernel for oqfl::qconv2d"
    return None


def _ao_skip_reason() -> Optional[str]:
    if ENGINE not in torch.backends.quantized.supported_engines:
        return (f"quantized engine {ENGINE!r} not in this torch build "
                f"({torch.backends.quantized.supported_engines})")
    return None


# ----------------------------------------------------------------------------------------------
# Weight packing (the blocked layout of csrc/qconv_args.h)
# ----------------------------------------------------------------------------------------------


def pack_conv_weight_reference(codes: torch.Tensor, bits: int, groups: int = 1) -> torch.Tensor:
    """The blocked layout of csrc/qconv_args.h, in plain PyTorch: codes [OC, ICg, KH, KW] ->
    int8 [G, OCB, KH, KW, ICB, 16, 4] (bits 8) or uint8 [G, OCB, KH, KW, ICB, 16, 2] (bits 4,
    element 2k of each 64-element row in the low nibble of byte k, two's complement)."""
    oc, icg, kh, kw = codes.shape
    ocg = oc // groups
    ocb, icb = math.ceil(ocg / 16), math.ceil(icg / 4)
    padded = torch.zeros(groups, ocb * 16, icb * 4, kh, kw, dtype=torch.int16)
    padded[:, :ocg, :icg] = codes.to(torch.int16).reshape(groups, ocg, icg, kh, kw)
    # (g, ob, j, cb, i, kh, kw) -> (g, ob, kh, kw, cb, j, i)
    blocked = padded.reshape(groups, ocb, 16, icb, 4, kh, kw).permute(0, 1, 5, 6, 3, 2, 4)
    blocked = blocked.contiguous()
    if bits == 8:
        return blocked.to(torch.int8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    rows = blocked.reshape(-1, 64) & 0xF
    packed = (rows[:, 0::2] | (rows[:, 1::2] << 4)).to(torch.uint8)
    return packed.reshape(groups, ocb, kh, kw, icb, 16, 2)


def pack_conv_weight(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, str]:
    """(packed, which packer): the extension's wrapper when it exists (checked against the
    reference layout), else the reference."""
    ref = pack_conv_weight_reference(codes, bits)
    try:
        from oqfl_ext import ops
        packer = getattr(ops, "pack_conv_weight", None)
    except Exception:
        packer = None
    if packer is None:
        return ref, "bench reference packer (oqfl_ext.ops.pack_conv_weight missing)"
    packed = packer(codes, bits)
    assert packed.dtype == ref.dtype and packed.shape == ref.shape and torch.equal(packed, ref), (
        f"oqfl_ext.ops.pack_conv_weight(bits={bits}) disagrees with the layout of qconv_args.h: "
        f"{packed.dtype} {tuple(packed.shape)} vs {ref.dtype} {tuple(ref.shape)}")
    return packed, "oqfl_ext.ops.pack_conv_weight"


# ----------------------------------------------------------------------------------------------
# One case: data, quantization parameters, packed weights, and the check
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    batch: int
    channels: int
    size: int
    x: torch.Tensor               # float32 [N, C, H, W] channels_last
    weight: torch.Tensor          # float32 [C, C, 3, 3] channels_last
    bias: torch.Tensor            # float32 [C]
    x_scale: float
    x_zero_point: int
    x_scale_t: torch.Tensor       # float32 [1]
    x_zero_point_t: torch.Tensor  # int32 [1]
    codes8: torch.Tensor          # int8 codes [C, C, 3, 3], -127..127
    scale8: torch.Tensor          # float32 [C]
    codes4: torch.Tensor          # int8 codes, -8..7
    scale4: torch.Tensor
    out_scale: float = 0.0        # torch.ao's output quantization
    out_zero_point: int = 0
    ao_packed: object = None
    packed8: Optional[torch.Tensor] = None
    packed4: Optional[torch.Tensor] = None
    packer: str = ""


def _quantize_weight(w: torch.Tensor, qmax: int):
    scale = (w.abs().amax(dim=(1, 2, 3)) / qmax).clamp_min(1e-12)
    codes = torch.round(w / scale[:, None, None, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return codes, scale.float()


def _input_codes(c: Case, x: torch.Tensor) -> torch.Tensor:
    """The op contract's u = clamp(round_half_even(x / s + z), qmin, qmax), as float."""
    return torch.clamp(torch.round(x / c.x_scale + c.x_zero_point), X_QMIN, X_QMAX)


def _reference(c: Case, codes: torch.Tensor, scale: torch.Tensor, images: int) -> torch.Tensor:
    """Exact float64 convolution of the dequantized input and weight codes, first `images`."""
    xd = (_input_codes(c, c.x[:images]).double() - c.x_zero_point) * c.x_scale
    wd = codes.double() * scale.double()[:, None, None, None]
    return F.conv2d(xd, wd, c.bias.double(), STRIDE, PADDING, DILATION)


@functools.lru_cache(maxsize=None)
def make_case(batch: int, channels: int, size: int) -> Case:
    gen = torch.Generator().manual_seed(1000 * channels + batch)
    x = torch.randn(batch, channels, size, size, generator=gen) + 0.5
    x = x.contiguous(memory_format=torch.channels_last)
    fan_in = channels * KERNEL * KERNEL
    w = torch.randn(channels, channels, KERNEL, KERNEL, generator=gen) * math.sqrt(2.0 / fan_in)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, generator=gen) * 0.1
    xmin, xmax = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x_scale = (xmax - xmin) / (X_QMAX - X_QMIN)
    x_zero_point = int(min(max(X_QMIN - round(xmin / x_scale), X_QMIN), X_QMAX))
    codes8, scale8 = _quantize_weight(w, 127)
    codes4, scale4 = _quantize_weight(w, 7)
    c = Case(batch, channels, size, x, w, bias, x_scale, x_zero_point,
             torch.tensor([x_scale], dtype=torch.float32),
             torch.tensor([x_zero_point], dtype=torch.int32),
             codes8, scale8, codes4, scale4)
    # torch.ao's output quantization: the range of the exact int8 result over the whole batch
    # (computed on a few images: the range of the rest is alike; values outside saturate).
    ref = _reference(c, codes8, scale8, min(batch, 4))
    lo, hi = min(ref.min().item(), 0.0), max(ref.max().item(), 0.0)
    span = (hi - lo) * 1.25  # headroom for the images not looked at
    c.out_scale = span / 255
    c.out_zero_point = int(min(max(round(-lo * 1.25 / c.out_scale), 0), 255))
    if _ao_skip_reason() is None:  # (the module fixture has set the x86 engine)
        wq = torch.quantize_per_channel(
            w.contiguous(), scale8.double(), torch.zeros(channels, dtype=torch.long), 0,
            torch.qint8)
        assert torch.equal(wq.int_repr(), codes8)
        c.ao_packed = torch.ops.quantized.conv2d_prepack(
            wq, bias, list(STRIDE), list(PADDING), list(DILATION), 1)
    if _oqfl_skip_reason() is None:
        c.packed8, c.packer = pack_conv_weight(codes8, 8)
        c.packed4, _ = pack_conv_weight(codes4, 4)
    return c


def make_fn(c: Case, impl: str):
    """The timed callable: float32 channels_last x -> float32 output."""
    if impl == "float_conv2d":
        return lambda: F.conv2d(c.x, c.weight, c.bias, STRIDE, PADDING, DILATION)
    if impl == "torch_ao_int8":
        conv = torch.ops.quantized.conv2d
        packed, s, z, os_, oz = c.ao_packed, c.x_scale, c.x_zero_point, c.out_scale, \
            c.out_zero_point

        def ao():
            qx = torch.quantize_per_tensor(c.x, s, z, torch.quint8)
            return conv(qx, packed, os_, oz).dequantize()
        return ao
    if impl in ("oqfl_int8", "oqfl_int4"):
        bits = 8 if impl == "oqfl_int8" else 4
        wp, ws = (c.packed8, c.scale8) if bits == 8 else (c.packed4, c.scale4)
        op = torch.ops.oqfl.qconv2d.default
        stride, padding, dilation = list(STRIDE), list(PADDING), list(DILATION)
        return lambda: op(c.x, c.x_scale_t, c.x_zero_point_t, wp, ws, c.bias, w_bits=bits,
                          stride=stride, padding=padding, dilation=dilation, groups=1,
                          relu=False, x_quant_min=X_QMIN, x_quant_max=X_QMAX)
    raise ValueError(impl)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@functools.lru_cache(maxsize=None)
def check_case(batch: int, channels: int, size: int) -> str:
    """Run every available path once on the case and check they compute the same thing.
    Returns a one-line summary (stored in extra_info)."""
    c = make_case(batch, channels, size)
    k = min(batch, CHECK_IMAGES)
    ref8 = _reference(c, c.codes8, c.scale8, k)
    ref_max = ref8.abs().max().item()
    notes = []

    y = make_fn(c, "float_conv2d")()
    assert y.is_contiguous(memory_format=torch.channels_last)
    # float vs the int8 result: quantization noise only (a few % of the output's RMS)
    rel = ((y[:k].double() - ref8).pow(2).mean().sqrt() / ref8.pow(2).mean().sqrt()).item()
    assert rel < 0.05, f"float F.conv2d vs int8 reference: relative RMS error {rel:.3g}"
    notes.append(f"float~int8 rms {rel:.2%}")

    ao = None
    if c.ao_packed is not None:
        ao = make_fn(c, "torch_ao_int8")()
        assert ao.shape == y.shape and ao.dtype == torch.float32
        err = _max_err(ao[:k], ref8)
        assert err <= AO_TOL_STEPS * c.out_scale, (
            f"torch.ao vs exact int8 reference: max error {err:.3g} > {AO_TOL_STEPS} output "
            f"steps ({c.out_scale:.3g})")
        notes.append(f"ao err {err / c.out_scale:.2f} out-steps")

    if c.packed8 is not None:
        # one input code flipped by a different rounding of x / s moves an output by at most
        # x_scale * max|w|: allow two such, far below any layout or indexing error.
        for bits, codes, scale in ((8, c.codes8, c.scale8), (4, c.codes4, c.scale4)):
            ours = make_fn(c, f"oqfl_int{bits}")()
            assert ours.shape == y.shape and ours.dtype == torch.float32, (ours.shape, ours.dtype)
            assert ours.is_contiguous(memory_format=torch.channels_last), \
                "channels_last in, channels_last out"
            ref = ref8 if bits == 8 else _reference(c, codes, scale, k)
            wmax = (codes.abs().amax(dim=(1, 2, 3)).double() * scale.double()).max().item()
            tol = 2 * c.x_scale * wmax + 1e-5 * ref.abs().max().item()
            err = _max_err(ours[:k], ref)
            assert err <= tol, f"oqfl int{bits} vs exact reference: max error {err:.3g} > {tol:.3g}"
            notes.append(f"int{bits} err {err / ref_max:.1e} rel")
            if bits == 8 and ao is not None:
                err = _max_err(ours, ao)
                assert err <= AO_TOL_STEPS * c.out_scale, (
                    f"oqfl int8 vs torch.ao (whole batch): max error {err:.3g} > "
                    f"{AO_TOL_STEPS} output steps ({c.out_scale:.3g})")
                notes.append(f"int8~ao {err / c.out_scale:.2f} out-steps")
    return "; ".join(notes)


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def _params():
    return [pytest.param(ch, size, batch, impl, id=f"{group_name(ch, size, batch)}-{impl}")
            for batch in BATCHES for ch, size in LAYERS for impl in IMPLS]


def _weight_bytes(impl: str, channels: int) -> int:
    if impl == "float_conv2d":
        return channels * channels * KERNEL * KERNEL * 4
    if impl == "torch_ao_int8":
        return channels * channels * KERNEL * KERNEL  # the qint8 codes (prepacked size unknown)
    return packed_weight_bytes(channels, channels, 8 if impl == "oqfl_int8" else 4)


@pytest.mark.parametrize("channels,size,batch,impl", _params())
def test_qconv(benchmark, channels, size, batch, impl):
    benchmark.group = group_name(channels, size, batch)
    if impl == "torch_ao_int8" and _ao_skip_reason():
        pytest.skip(_ao_skip_reason())
    if impl.startswith("oqfl") and _oqfl_skip_reason():
        pytest.skip(_oqfl_skip_reason())
    # The CI smoke run (--benchmark-disable) calls each function once: batch 1 keeps it cheap.
    run_batch = 1 if benchmark.disabled else batch
    check = check_case(run_batch, channels, size)
    c = make_case(run_batch, channels, size)
    fn = make_fn(c, impl)
    benchmark.extra_info.update({
        "impl": impl, "batch": run_batch, "channels": channels, "size": size,
        "ops": conv_ops(run_batch, channels, size),
        "weight_bytes": _weight_bytes(impl, channels),
        "torch_num_threads": torch.get_num_threads(),
        "quantized_engine": torch.backends.quantized.engine,
        "x_quant_range": [X_QMIN, X_QMAX],
        "loadavg": _loadavg(), "check": check,
    })
    if impl.startswith("oqfl"):
        benchmark.extra_info["packer"] = c.packer
    y = benchmark(fn)
    assert y.shape == (run_batch, channels, size, size)
