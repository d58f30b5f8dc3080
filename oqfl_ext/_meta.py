"""Fake (meta) kernels: output shapes, dtypes and layouts without touching data.

They let torch.compile, FakeTensorMode and torch.export trace code that calls the ops. The
checks here are those that depend only on metadata; the C++ kernels repeat them (and check
values) because they also guard memory.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .ops import _IC_BLOCK, _OC_BLOCK, _ceil_div, _qconv_max_reduction

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


_INT64_MAX = (1 << 63) - 1


def _check_steps(op: str, shape, device: torch.device, scale: Tensor,
                 zero_point: Optional[Tensor], axis: Optional[int], shape_name: str = "x.shape",
                 device_name: str = "x") -> None:
    """Axis against ``shape``, and the dtype, device and shape of scale/zero_point (StepTarget
    in C++). The device check matters here: a meta scale with a CPU x dispatches to this fake
    kernel, which would otherwise return uninitialised memory."""
    dim = len(shape)
    if axis is not None and not -dim <= axis < dim:
        raise ValueError(
            f"{op}: axis expected an integer in [{-dim}, {dim}) for {shape_name} "
            f"{list(shape)}, got {axis}")
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} expected dtype float32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name} expected to be on the device of {device_name} "
                             f"({device}), got {t.device}")
        if axis is None:
            if t.numel() != 1 or t.dim() > 1:
                raise ValueError(f"{op}: {name} expected a single value (shape [] or [1]) when "
                                 f"axis is None, got shape {list(t.shape)}")
        elif t.dim() != 1 or t.shape[0] != shape[axis]:
            raise ValueError(f"{op}: {name} expected shape [{shape[axis]}] ({shape_name}[{axis % dim}] "
                             f"values), got shape {list(t.shape)}")


def _check_args(op: str, x: Tensor, scale: Tensor, zero_point: Optional[Tensor],
                quant_min: int, quant_max: int, axis: Optional[int]) -> None:
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: x expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if quant_min >= quant_max:
        raise ValueError(f"{op}: quant_min expected less than quant_max ({quant_max}), got {quant_min}")
    _check_steps(op, x.shape, x.device, scale, zero_point, axis)


def _is_dense(x: Tensor) -> bool:
    """Non-overlapping and dense: some order of the dimensions makes x contiguous."""
    expected = 1
    for size, stride in sorted((p for p in zip(x.shape, x.stride()) if p[0] != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _like(x: Tensor) -> Tensor:
    # The kernels keep x's strides when x is non-overlapping and dense (any dimension order)
    # and work on a contiguous copy otherwise (fake_quant_args.h).
    if _is_dense(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("oqfl::fake_quant")
def _fake_quant_fake(x, scale, zero_point=None, *, quant_min, quant_max, axis=None,
                     grad_factor=1.0):
    _check_args("fake_quant", x, scale, zero_point, quant_min, quant_max, axis)
    return _like(x)


@torch.library.register_fake("oqfl::fake_quant_backward")
def _fake_quant_backward_fake(grad_output, x, scale, zero_point=None, *, quant_min, quant_max,
                              axis=None, grad_factor=1.0,
                              output_mask: Sequence[bool] = (True, True, True)):
    op = "fake_quant_backward"
    _check_args(op, x, scale, zero_point, quant_min, quant_max, axis)
    # check_grad_output in C++
    if grad_output.shape != x.shape:
        raise ValueError(f"{op}: grad_output expected the shape of x {list(x.shape)}, got "
                         f"{list(grad_output.shape)}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"{op}: grad_output expected the dtype of x ({x.dtype}), got "
                        f"{grad_output.dtype}")
    if grad_output.device != x.device:
        raise ValueError(f"{op}: grad_output expected to be on the device of x ({x.device}), "
                         f"got {grad_output.device}")
    skipped = scale.new_empty((0,))
    grad_x = _like(x) if output_mask[0] else x.new_empty((0,))
    grad_scale = torch.empty_like(scale, memory_format=torch.contiguous_format) \
        if output_mask[1] else skipped
    grad_zero_point = torch.empty_like(zero_point, memory_format=torch.contiguous_format) \
        if output_mask[2] and zero_point is not None else scale.new_empty((0,))
    return grad_x, grad_scale, grad_zero_point


# ------------------------------------------------------------------ packing ops (packing_args.h)

def _check_bits(op: str, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{op}: bits expected 4 or 8, got {bits}")


def _packed_bytes(numel, bits: int):
    return (numel * bits + 7) // 8


def _check_packed(op: str, packed: Tensor, bits: int, numel) -> None:
    _check_bits(op, bits)
    if numel < 0:
        raise ValueError(f"{op}: numel expected a non-negative count, got {numel}")
    max_numel = (_INT64_MAX - 7) // bits  # numel * bits + 7 must not wrap in C++
    if numel > max_numel:
        raise ValueError(f"{op}: numel expected at most {max_numel} codes of {bits} bits, "
                         f"got {numel}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed expected dtype uint8, got {packed.dtype}")
    nbytes = _packed_bytes(numel, bits)
    if packed.dim() != 1 or packed.shape[0] != nbytes:
        raise ValueError(f"{op}: packed expected shape [{nbytes}] ({numel} codes of {bits} bits), "
                         f"got shape {list(packed.shape)}")


@torch.library.register_fake("oqfl::_row_absmax")
def _row_absmax_fake(x):
    if x.dtype != torch.float32 or x.dim() == 0:
        raise ValueError(f"_row_absmax: x expected a float32 tensor with at least one "
                         f"dimension, got {x.dtype} with {x.dim()}")
    return x.new_empty((x.shape[0],))


@torch.library.register_fake("oqfl::pack")
def _pack_fake(q, bits):
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack: q expected dtype int8 (signed codes) or uint8 (unsigned codes), "
                        f"got {q.dtype}")
    _check_bits("pack", bits)
    return q.new_empty((_packed_bytes(q.numel(), bits),), dtype=torch.uint8)


@torch.library.register_fake("oqfl::unpack")
def _unpack_fake(packed, bits, numel, signed=True):
    _check_packed("unpack", packed, bits, numel)
    return packed.new_empty((numel,), dtype=torch.int8 if signed else torch.uint8)


@torch.library.register_fake("oqfl::quantize_pack")
def _quantize_pack_fake(x, scale, zero_point=None, *, bits, axis=None, stochastic=False,
                        generator=None):
    _check_bits("quantize_pack", bits)
    _check_args("quantize_pack", x, scale, zero_point, -(1 << (bits - 1)), (1 << (bits - 1)) - 1,
                axis)
    return x.new_empty((_packed_bytes(x.numel(), bits),), dtype=torch.uint8)


@torch.library.register_fake("oqfl::unpack_dequantize")
def _unpack_dequantize_fake(packed, scale, zero_point=None, *, bits, shape, axis=None):
    if any(d < 0 for d in shape):
        raise ValueError(f"unpack_dequantize: shape expected non-negative sizes, got {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
        if numel > _INT64_MAX:
            raise ValueError(f"unpack_dequantize: shape expected sizes whose product fits in "
                             f"int64, got {list(shape)}")
    _check_packed("unpack_dequantize", packed, bits, numel)
    _check_steps("unpack_dequantize", shape, packed.device, scale, zero_point, axis,
                 shape_name="shape", device_name="packed")
    return packed.new_empty(tuple(shape), dtype=torch.float32)


# ------------------------------------------------- integer inference (qconv_args.h)
# The metadata checks of csrc/qconv_args.cpp, in the same order and with the same messages.
# The value checks (positive finite scales, a zero point inside the code domain) read data
# and exist only in the CPU kernel.

def _dims(sizes) -> str:
    return "[" + ", ".join(str(d) for d in sizes) + "]"


def _qconv_arg(cond, op: str, arg: str, expected: str, got: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {arg} expected {expected}, got {got}")


def _qconv_dtype(cond, op: str, arg: str, expected: str, got) -> None:
    if not cond:
        raise TypeError(f"{op}: {arg} expected {expected}, got {got}")


def _qconv_same_device(op: str, arg: str, t: Tensor, x: Tensor) -> None:
    _qconv_arg(t.device == x.device, op, arg, f"to be on the device of x ({x.device})",
               str(t.device))


def _qconv_check_common(op: str, x: Tensor, x_scale: Tensor, x_zero_point: Tensor,
                        w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], w_bits: int,
                        x_quant_min: int, x_quant_max: int) -> int:
    """check_common of qconv_args.cpp; returns the number of output channels."""
    _qconv_dtype(x.dtype in (torch.float32, torch.uint8, torch.int8), op, "x",
                 "dtype float32 (values), uint8 or int8 (codes)", x.dtype)
    _qconv_dtype(x_scale.dtype == torch.float32, op, "x_scale", "dtype float32", x_scale.dtype)
    _qconv_arg(x_scale.numel() == 1 and x_scale.dim() <= 1, op, "x_scale",
               "a single value (shape [] or [1])", f"shape {_dims(x_scale.shape)}")
    _qconv_same_device(op, "x_scale", x_scale, x)
    _qconv_dtype(x_zero_point.dtype in (torch.int32, torch.int64), op, "x_zero_point",
                 "an integer dtype (int32 or int64)", x_zero_point.dtype)
    _qconv_arg(x_zero_point.numel() == 1 and x_zero_point.dim() <= 1, op, "x_zero_point",
               "a single value (shape [] or [1])", f"shape {_dims(x_zero_point.shape)}")
    _qconv_same_device(op, "x_zero_point", x_zero_point, x)
    _qconv_arg(w_bits in (4, 8), op, "w_bits", "4 or 8", str(w_bits))
    if w_bits == 8:
        _qconv_dtype(w_packed.dtype == torch.int8, op, "w_packed", "dtype int8 for w_bits=8",
                     w_packed.dtype)
    else:
        _qconv_dtype(w_packed.dtype == torch.uint8, op, "w_packed",
                     "dtype uint8 (two int4 codes per byte) for w_bits=4", w_packed.dtype)
    _qconv_same_device(op, "w_packed", w_packed, x)
    _qconv_dtype(w_scale.dtype == torch.float32, op, "w_scale", "dtype float32", w_scale.dtype)
    _qconv_arg(w_scale.dim() == 1 and w_scale.shape[0] >= 1, op, "w_scale",
               "shape [OC] with OC >= 1 (one step size per output channel)",
               f"shape {_dims(w_scale.shape)}")
    _qconv_same_device(op, "w_scale", w_scale, x)
    oc = w_scale.shape[0]
    if bias is not None:
        _qconv_dtype(bias.dtype == torch.float32, op, "bias", "dtype float32", bias.dtype)
        _qconv_arg(bias.dim() == 1 and bias.shape[0] == oc, op, "bias",
                   f"shape [{oc}] (the size of w_scale)", f"shape {_dims(bias.shape)}")
        _qconv_same_device(op, "bias", bias, x)
    if x.dtype == torch.float32:
        _qconv_arg(x_quant_min < x_quant_max, op, "x_quant_min",
                   f"less than x_quant_max ({x_quant_max})", str(x_quant_min))
        if x_quant_min < 0:
            _qconv_arg(x_quant_min >= -128 and x_quant_max <= 127, op,
                       "x_quant_min/x_quant_max",
                       "a range inside -128..127 (signed codes, x_quant_min < 0)",
                       f"{x_quant_min}..{x_quant_max}")
        else:
            _qconv_arg(x_quant_max <= 255, op, "x_quant_max",
                       "at most 255 (unsigned codes, x_quant_min >= 0)", str(x_quant_max))
    return oc


def _qconv_pair(op: str, arg: str, v) -> list:
    _qconv_arg(len(v) in (1, 2), op, arg, "one or two integers", _dims(v))
    return [v[0], v[0]] if len(v) == 1 else list(v)


def _qconv_check_limits(op: str, n, hp, wp, groups: int, icb, oc, oh, ow, icg, kh, kw,
                        w_bits: int, padded: bool, got: str) -> None:
    """check_limits of qconv_args.cpp: buffer and output bytes in int64, the int32 reduction."""
    _qconv_arg(n * hp * wp * groups * icb * _IC_BLOCK <= _INT64_MAX, op,
               "padding" if padded else "x",
               "a zero-point-padded code buffer of N * (H + 2 * pad_h) * (W + 2 * pad_w) * "
               "groups * ceil(C / groups / 4) * 4 bytes that fits in int64", got)
    _qconv_arg(n * oc * oh * ow * 4 <= _INT64_MAX, op, "w_scale",
               f"a length OC for which the output of N * OC * OH * OW float32 values (OH={oh}, "
               f"OW={ow}) fits in int64 bytes", f"OC = {oc} for x of {got}")
    k = icg * kh * kw
    limit = _qconv_max_reduction(w_bits)
    _qconv_arg(k <= limit, op, "x",
               f"a reduction length K = C / groups * KH * KW of at most {limit} for "
               f"w_bits={w_bits} (K * 255 * max|weight code| must fit the int32 accumulator)",
               f"K = {k if k <= _INT64_MAX else 'more than 2^63'} (C / groups = {icg}, "
               f"KH = {kh}, KW = {kw}) for {got}")


_FLOAT32_MAX = 3.4028234663852886e38


def _qconv_check_epilogue(op: str, x: Tensor, out_shape, relu: bool,
                          residual: Optional[Tensor], clamp_max: Optional[float],
                          out_scale: Optional[Tensor], out_zero_point: Optional[Tensor],
                          out_quant_min: int, out_quant_max: int) -> torch.dtype:
    """check_qconv_epilogue of qconv_args.cpp; returns the output dtype."""
    if residual is not None:
        _qconv_dtype(residual.dtype == torch.float32, op, "residual", "dtype float32",
                     residual.dtype)
        _qconv_arg(list(residual.shape) == list(out_shape), op, "residual",
                   f"the output's shape {_dims(out_shape)}", f"shape {_dims(residual.shape)}")
        _qconv_same_device(op, "residual", residual, x)
    if clamp_max is not None:
        _qconv_arg(math.isfinite(clamp_max) and abs(clamp_max) <= _FLOAT32_MAX, op,
                   "clamp_max", "a finite float32 value", str(clamp_max))
        _qconv_arg(not relu or clamp_max >= 0, op, "clamp_max", "a value >= 0 when relu=True",
                   str(clamp_max))
    _qconv_arg(out_scale is not None or out_zero_point is None, op, "out_scale",
               "a tensor when out_zero_point is given (code output)", "None")
    if out_scale is None:
        return torch.float32
    _qconv_dtype(out_scale.dtype == torch.float32, op, "out_scale", "dtype float32",
                 out_scale.dtype)
    _qconv_arg(out_scale.numel() == 1 and out_scale.dim() <= 1, op, "out_scale",
               "a single value (shape [] or [1])", f"shape {_dims(out_scale.shape)}")
    _qconv_same_device(op, "out_scale", out_scale, x)
    _qconv_arg(out_zero_point is not None, op, "out_zero_point",
               "a tensor when out_scale is given (code output)", "None")
    _qconv_dtype(out_zero_point.dtype in (torch.int32, torch.int64), op, "out_zero_point",
                 "an integer dtype (int32 or int64)", out_zero_point.dtype)
    _qconv_arg(out_zero_point.numel() == 1 and out_zero_point.dim() <= 1, op,
               "out_zero_point", "a single value (shape [] or [1])",
               f"shape {_dims(out_zero_point.shape)}")
    _qconv_same_device(op, "out_zero_point", out_zero_point, x)
    lo, hi = out_quant_min, out_quant_max
    _qconv_arg(lo <= hi, op, "out_quant_min", f"at most out_quant_max ({hi})", str(lo))
    if lo < 0:
        _qconv_arg(lo >= -128 and hi <= 127, op, "out_quant_min/out_quant_max",
                   "a range inside -128..127 (int8 codes, out_quant_min < 0)", f"{lo}..{hi}")
        return torch.int8
    _qconv_arg(hi <= 255, op, "out_quant_max", "at most 255 (uint8 codes, out_quant_min >= 0)",
               str(hi))
    return torch.uint8


def _has_op(name: str) -> bool:
    # A _C built before these schemas existed (a stale development build) still imports; the
    # fake kernels are then skipped rather than failing every import of the package.
    return hasattr(torch.ops.oqfl, name)


def _qconv2d_fake(x, x_scale, x_zero_point, w_packed, w_scale, bias=None, *, w_bits,
                  stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, relu=False,
                  x_quant_min=0, x_quant_max=255, residual=None, clamp_max=None,
                  out_scale=None, out_zero_point=None, out_quant_min=0, out_quant_max=255):
    op = "qconv2d"
    _qconv_arg(x.dim() == 4, op, "x", "a 4-d tensor [N, C, H, W]", f"shape {_dims(x.shape)}")
    oc = _qconv_check_common(op, x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits,
                             x_quant_min, x_quant_max)
    n, c, h, w = x.shape
    _qconv_arg(groups >= 1, op, "groups", "a positive integer", str(groups))
    _qconv_arg(c >= groups and c % groups == 0, op, "x",
               f"a channel count that is a positive multiple of groups ({groups})",
               f"shape {_dims(x.shape)}")
    _qconv_arg(oc >= groups and oc % groups == 0, op, "w_scale",
               f"a length (OC) that is a positive multiple of groups ({groups})",
               f"shape {_dims(w_scale.shape)}")
    ocb = _ceil_div(oc // groups, _OC_BLOCK)
    icb = _ceil_div(c // groups, _IC_BLOCK)
    row = 4 if w_bits == 8 else 2
    _qconv_arg(w_packed.dim() == 7, op, "w_packed",
               f"a 7-d blocked weight [G, OCB, KH, KW, ICB, 16, {row}]",
               f"shape {_dims(w_packed.shape)}")
    kh, kw = w_packed.shape[2], w_packed.shape[3]
    _qconv_arg(kh >= 1 and kw >= 1, op, "w_packed", "a kernel size KH, KW >= 1 (dims 2 and 3)",
               f"shape {_dims(w_packed.shape)}")
    expected = [groups, ocb, kh, kw, icb, 16, row]
    _qconv_arg(list(w_packed.shape) == expected, op, "w_packed",
               f"shape {_dims(expected)} for groups={groups}, OC={oc} (w_scale), IC={c} (x) "
               f"and w_bits={w_bits}", f"shape {_dims(w_packed.shape)}")
    sh, sw = _qconv_pair(op, "stride", stride)
    ph, pw = _qconv_pair(op, "padding", padding)
    dh, dw = _qconv_pair(op, "dilation", dilation)
    _qconv_arg(sh >= 1 and sw >= 1, op, "stride", "positive integers", _dims(stride))
    _qconv_arg(ph >= 0 and pw >= 0, op, "padding", "non-negative integers", _dims(padding))
    _qconv_arg(dh >= 1 and dw >= 1, op, "dilation", "positive integers", _dims(dilation))
    eff_h, eff_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    _qconv_arg(eff_h <= _INT64_MAX and eff_w <= _INT64_MAX, op, "dilation",
               "a dilated kernel extent dilation * (K - 1) + 1 that fits in int64 for the "
               f"kernel size {_dims([kh, kw])}", _dims(dilation))
    hp, wp = h + 2 * ph, w + 2 * pw
    _qconv_arg(hp <= _INT64_MAX and wp <= _INT64_MAX, op, "padding",
               "a padded input size (H + 2 * padding, W + 2 * padding) that fits in int64 for "
               f"x of shape {_dims(x.shape)}", _dims(padding))
    span_h, span_w = hp - eff_h, wp - eff_w
    _qconv_arg(span_h >= 0 and span_w >= 0, op, "x",
               "a padded input (H + 2 * padding, W + 2 * padding) at least as large as the "
               f"dilated kernel {_dims([eff_h, eff_w])} (a non-empty output)",
               f"shape {_dims(x.shape)} with padding {_dims(padding)}")
    oh, ow = span_h // sh + 1, span_w // sw + 1
    _qconv_check_limits(op, n, hp, wp, groups, icb, oc, oh, ow, c // groups, kh, kw, w_bits,
                        ph > 0 or pw > 0,
                        f"shape {_dims(x.shape)} with padding {_dims(padding)}")
    dtype = _qconv_check_epilogue(op, x, [n, oc, oh, ow], relu, residual, clamp_max, out_scale,
                                  out_zero_point, out_quant_min, out_quant_max)
    # channels_last in, channels_last out (x.suggest_memory_format() in C++); codes always
    # channels_last
    from torch._prims_common import suggest_memory_format
    fmt = torch.channels_last if dtype != torch.float32 or \
        suggest_memory_format(x) == torch.channels_last else torch.contiguous_format
    return torch.empty((n, oc, oh, ow), dtype=dtype, device=x.device, memory_format=fmt)


def _qlinear_fake(x, x_scale, x_zero_point, w_packed, w_scale, bias=None, *, w_bits,
                  relu=False, x_quant_min=0, x_quant_max=255, residual=None, clamp_max=None,
                  out_scale=None, out_zero_point=None, out_quant_min=0, out_quant_max=255):
    op = "qlinear"
    _qconv_arg(x.dim() >= 1, op, "x", "at least one dimension ([..., IC])",
               f"shape {_dims(x.shape)}")
    oc = _qconv_check_common(op, x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits,
                             x_quant_min, x_quant_max)
    ic = x.shape[-1]
    _qconv_arg(ic >= 1, op, "x", "a last dimension (IC) of at least 1",
               f"shape {_dims(x.shape)}")
    row = 4 if w_bits == 8 else 2
    expected = [_ceil_div(oc, _OC_BLOCK), _ceil_div(ic, _IC_BLOCK), 16, row]
    _qconv_arg(list(w_packed.shape) == expected, op, "w_packed",
               f"shape {_dims(expected)} for OC={oc} (w_scale), IC={ic} (x.shape[-1]) and "
               f"w_bits={w_bits}", f"shape {_dims(w_packed.shape)}")
    m = 1
    for d in x.shape[:-1]:
        m *= d
    _qconv_check_limits(op, m, 1, 1, 1, expected[1], oc, 1, 1, ic, 1, 1, w_bits, False,
                        f"shape {_dims(x.shape)}")
    out_shape = [*x.shape[:-1], oc]
    dtype = _qconv_check_epilogue(op, x, out_shape, relu, residual, clamp_max, out_scale,
                                  out_zero_point, out_quant_min, out_quant_max)
    return torch.empty(out_shape, dtype=dtype, device=x.device)


if _has_op("qconv2d"):
    torch.library.register_fake("oqfl::qconv2d")(_qconv2d_fake)
if _has_op("qlinear"):
    torch.library.register_fake("oqfl::qlinear")(_qlinear_fake)
