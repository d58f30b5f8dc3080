"""Typed public wrappers around the ``torch.ops.oqfl`` custom ops.

The ops themselves are defined in ``csrc/registration.cpp`` (schemas), implemented in
``csrc/cpu`` and ``csrc/cuda``, given fake (meta) kernels in ``oqfl_ext._meta`` and autograd
formulas in ``oqfl_ext._autograd``. These wrappers only document and forward; every check that
guards memory lives in C++, so calling ``torch.ops.oqfl.*`` directly is equally safe.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["fake_quant", "fake_quant_backward", "lsq_grad_factor", "pack", "unpack",
           "quantize_pack", "unpack_dequantize", "cpu_capability", "qconv2d", "qlinear",
           "pack_conv_weight", "unpack_conv_weight", "pack_linear_weight", "unpack_linear_weight",
           "conv_weight_layout_shape", "linear_weight_layout_shape"]


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    *,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """LSQ fake quantization with a learnable step size and an optional learnable offset.

    For each element, with ``s`` the step size and ``z`` the offset of its slice::

        v = x / s + z
        q = clamp(round_half_to_even(v), quant_min, quant_max)
        y = (q - z) * s

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (empty allowed, any strides).
        scale: float32 step sizes, positive and finite, on ``x``'s device. ``axis=None``: one
            value, shape ``[]`` or ``[1]``. Otherwise ``x.shape[axis]`` values (shape ``[C]``).
        zero_point: optional float32 offset in the integer domain, same shape and device rules
            as ``scale``. ``None`` means 0. Non-integer values are allowed (LSQ+).
        quant_min, quant_max: integer bounds, ``quant_min < quant_max``.
        axis: the per-channel axis (negative allowed), or ``None`` for one step size.
        grad_factor: multiplies the gradients of ``scale`` and ``zero_point`` (LSQ's
            ``1 / sqrt(N_s * quant_max)``, see :func:`lsq_grad_factor`).

    Returns:
        A tensor with ``x``'s shape, dtype, device and memory layout.

    Differentiable in ``x``, ``scale`` and ``zero_point`` (straight-through estimator for the
    rounding; values exactly on ``quant_min``/``quant_max`` count as in range). On CPU, invalid
    step sizes raise; on CUDA they are not read on the host (that would synchronize), and an
    element whose step size is not positive and finite comes out as NaN.
    """
    return torch.ops.oqfl.fake_quant(
        x, scale, zero_point,
        quant_min=quant_min, quant_max=quant_max, axis=axis, grad_factor=grad_factor,
    )


def fake_quant_backward(
    grad_output: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    *,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_factor: float = 1.0,
    output_mask: Sequence[bool] = (True, True, True),
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`fake_quant` in one pass over the data.

    Returns ``(grad_x, grad_scale, grad_zero_point)``; an entry is ``None`` when its
    ``output_mask`` flag is false (or, for ``grad_zero_point``, when ``zero_point`` is None),
    and the work for it is skipped. ``grad_x`` has ``x``'s dtype and layout; ``grad_scale``
    and ``grad_zero_point`` are float32 with the shapes of ``scale`` and ``zero_point``,
    summed in float32 lanes per fixed-size chunk and across chunks in float64 (deterministic
    on CPU whatever the thread count).
    """
    gx, gs, gz = torch.ops.oqfl.fake_quant_backward(
        grad_output, x, scale, zero_point,
        quant_min=quant_min, quant_max=quant_max, axis=axis, grad_factor=grad_factor,
        output_mask=list(output_mask),
    )
    want_z = bool(output_mask[2]) and zero_point is not None
    return (
        gx if output_mask[0] else None,
        gs if output_mask[1] else None,
        gz if want_z else None,
    )


def lsq_grad_factor(elements_per_step: int, quant_max: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N_s * quant_max)`` (N_s elements share one step size)."""
    if elements_per_step <= 0 or quant_max <= 0:
        return 1.0
    return 1.0 / float(elements_per_step * quant_max) ** 0.5


def pack(q: Tensor, bits: int) -> Tensor:
    """Packs integer codes into bytes.

    The layout (``csrc/common/bitpack.h``, docs/DESIGN.md section 3) is the same on every device and
    is what :func:`quantize_pack` writes and :func:`unpack` / :func:`unpack_dequantize` read::

        bits=8: one byte per code (the int8 two's complement bits, or the uint8 value).
        bits=4: two codes per byte: code 2i in the LOW nibble of byte i, code 2i+1 in the
                HIGH nibble, signed codes as their low 4 bits (two's complement); an odd
                count leaves the last high nibble 0.
        e.g. int4 codes [1, -2, 7, -8, 3] -> bytes [0xE1, 0x87, 0x03]

    n codes take ``ceil(n * bits / 8)`` bytes. None of the packing ops is differentiable (no
    autograd formula is registered): pass tensors that do not require grad.

    Args:
        q: int8 (signed codes) or uint8 (unsigned codes) tensor of any shape and strides; packed
            in row-major order (``q.contiguous()``'s order).
        bits: 4 or 8. With 4, codes must lie in [-8, 7] (int8) or [0, 15] (uint8): on CPU an
            out-of-range code raises ValueError; on CUDA it is not checked (that would
            synchronize) and only its low 4 bits are kept.

    Returns:
        A flat uint8 tensor of ``ceil(q.numel() * bits / 8)`` bytes on ``q``'s device.
    """
    return torch.ops.oqfl.pack(q, bits)


def unpack(packed: Tensor, bits: int, numel: int, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack` (which documents the layout): ``numel`` codes from their bytes.

    Args:
        packed: 1-D uint8 tensor of exactly ``ceil(numel * bits / 8)`` bytes.
        bits: 4 or 8.
        numel: the number of codes.
        signed: int4 nibbles are sign-extended and the result is int8 when True; read as
            unsigned (uint8 result) when False.

    Returns:
        A flat int8 (``signed``) or uint8 tensor of ``numel`` codes; reshape it as needed.
    """
    return torch.ops.oqfl.unpack(packed, bits, numel, signed)


def quantize_pack(
    x: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    *,
    bits: int,
    axis: Optional[int] = None,
    stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Quantizes ``x`` to signed ``bits``-bit codes and packs them, in one pass.

    With ``s`` and ``z`` the step size and offset of an element's slice and
    ``[qmin, qmax]`` the signed range (bits 4: [-8, 7], bits 8: [-128, 127])::

        v = x / s + z                      (float32)
        q = clamp(round(v), qmin, qmax)

    ``round`` is half to even (the codes of :func:`fake_quant` with the same arguments, so
    ``unpack_dequantize(quantize_pack(x, ...), ...)`` equals ``fake_quant(x, ...)``), or with
    ``stochastic=True`` unbiased stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``, so
    ``E[q] = v`` inside the range.

    Stochastic rounding draws one int64 seed from ``generator`` (a CPU generator or one on
    ``x``'s device; None: the default generator of ``x``'s device), exactly as
    ``torch.randint(2**63 - 1, (1,), generator=generator)`` does, which advances the generator;
    element ``i`` (row-major) then gets a 24-bit uniform ``u`` hashed from ``(seed, i)``:
    with ``key = splitmix64(seed)``, ``add = key mod 2**32`` and ``mid = (key >> 32) ^ ((i >>
    32) * 0x9E3779B9 mod 2**32)``, ``u = (lowbias32(fmix32((i + add) mod 2**32) + mid) >> 8) *
    2**-24`` (arithmetic mod ``2**32``; fmix32 is MurmurHash3's finalizer, lowbias32 the
    multipliers 0x7FEB352D, 0x846CA68B; docs/DESIGN.md writes both out). The codes are
    therefore a pure function of the seed: the same on CPU and CUDA for the same seed and
    independent of the thread count.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape and strides; packed in row-major
            order (``x.contiguous()``'s order).
        scale, zero_point, axis: as in :func:`fake_quant` (float32; one value, or
            ``x.shape[axis]`` values). On CPU invalid step sizes raise; on CUDA they are not
            read on the host, and their elements get code 0. NaN inputs also get code 0.
        bits: 4 or 8.

    Returns:
        A flat uint8 tensor of ``ceil(x.numel() * bits / 8)`` bytes (layout: :func:`pack`).
    """
    return torch.ops.oqfl.quantize_pack(x, scale, zero_point, bits=bits, axis=axis,
                                        stochastic=stochastic, generator=generator)


def unpack_dequantize(
    packed: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor] = None,
    *,
    bits: int,
    shape: Sequence[int],
    axis: Optional[int] = None,
) -> Tensor:
    """Float32 values ``(q - z) * s`` of packed signed codes (the output of
    :func:`quantize_pack`).

    Args:
        packed: 1-D uint8 tensor of exactly ``ceil(prod(shape) * bits / 8)`` bytes.
        scale, zero_point, axis: float32 step sizes and offsets, checked against ``shape`` as
            :func:`fake_quant` checks them against ``x.shape``; on the device of ``packed``.
        bits: 4 or 8.
        shape: the logical (row-major) shape of the codes.

    Returns:
        A contiguous float32 tensor of ``shape`` on ``packed``'s device.
    """
    return torch.ops.oqfl.unpack_dequantize(packed, scale, zero_point, bits=bits,
                                            shape=list(shape), axis=axis)


def cpu_capability() -> str:
    """The CPU code path the kernels use: ``"amx"``, ``"avx512"``, ``"avx2"`` or ``"default"``.

    ``"amx"`` (AMX-INT8 CPUs whose OS grants the tile state) runs the integer convolution on
    AMX tiles and everything else as ``"avx512"``; its results are bit-identical to the other
    paths'.

    Chosen at load time from the CPU; ``OQFL_CPU_CAPABILITY`` (or PyTorch's
    ``ATEN_CPU_CAPABILITY``) set to one of these names lowers it, never raises it above what
    the CPU supports.
    """
    return torch.ops.oqfl._cpu_capability()


# ------------------------------------------------------------------ integer inference

_OC_BLOCK = 16  # output channels per weight block (kQConvOcBlock in csrc/qconv_args.h)
_IC_BLOCK = 4   # input channels per weight block (kQConvIcBlock)


def _qconv_max_reduction(w_bits: int) -> int:
    """The largest reduction length ``K`` whose int32 accumulation cannot overflow:
    ``K * 255 * max|weight code|`` (128 for 8 bits, 8 for 4 bits) must fit in int32 (255: the
    span of either code domain). Mirrors qconv_max_reduction in csrc/qconv_args.cpp."""
    return (2**31 - 1) // (255 * (128 if w_bits == 8 else 8))

IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, value: IntPair) -> List[int]:
    """``value`` as a list of two ints: an int is repeated, a sequence must have 1 or 2 entries."""
    def as_int(v):
        if isinstance(v, (bool, float)) or (not isinstance(v, (int, torch.SymInt))
                                            and not hasattr(v, "__index__")):
            raise TypeError(f"{op}: {name} expected an int or a pair of ints, got {value!r}")
        return v if isinstance(v, (int, torch.SymInt)) else operator.index(v)

    if isinstance(value, (Tensor, str)) or not isinstance(value, Sequence):
        return [as_int(value)] * 2
    items = [as_int(v) for v in value]
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise ValueError(f"{op}: {name} expected an int or a pair of ints, got {value!r}")
    return items


def qconv2d(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    w_bits: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool = False,
    x_quant_min: int = 0,
    x_quant_max: int = 255,
    residual: Optional[Tensor] = None,
    clamp_max: Optional[float] = None,
    out_scale: Optional[Tensor] = None,
    out_zero_point: Optional[Tensor] = None,
    out_quant_min: int = 0,
    out_quant_max: int = 255,
) -> Tensor:
    """Integer 2-D convolution: quantized activations times packed per-channel weight codes.

    The activations are quantized per tensor (one step size ``x_scale`` and one integer zero
    point ``x_zero_point``), the weights symmetrically per output channel (codes ``w`` and step
    sizes ``w_scale``). With ``u`` the activation codes, everything is summed in int32 and
    rescaled once per output element (float32, each operation rounded separately)::

        u      = clamp(round_half_to_even(x / x_scale + x_zero_point), x_quant_min, x_quant_max)
        acc    = sum over the kernel taps and the group's input channels of u * w
                 (a padding tap holds the code x_zero_point, i.e. the real value 0)
        wsum_o = sum of the weight codes of output channel o
        out    = float(acc - x_zero_point * wsum_o) * (x_scale * w_scale[o]) + bias[o]
        out    = out + residual           when residual is given
        out    = max(out, 0)              when relu
        out    = min(out, clamp_max)      when clamp_max is given (relu + 6: ReLU6)
        codes  = clamp(round_half_to_even(out / out_scale + out_zero_point),
                       out_quant_min, out_quant_max)   when out_scale is given

    i.e. ``sum((u - x_zero_point) * w)`` rescaled: the convolution of the dequantized tensors,
    computed exactly in integers (``F.conv2d(dequantized x, dequantized w, bias, ...)`` up to
    float rounding). The epilogue (residual add, relu, clamp, requantization) is fused: a
    network of integer layers needs no float pass between them, and with ``out_scale`` a layer
    writes the codes its consumer takes as ``x`` (with the consumer's ``x_scale`` and
    ``x_zero_point``); the codes equal quantizing the float output, bit for bit.

    Args:
        x: ``[N, C, H, W]`` in NCHW (contiguous) or channels_last memory format; other strides
            are copied first. float32 values, quantized inside the op as above; or uint8 codes
            (code domain 0..255) or int8 codes (-128..127), taken as they are.
        x_scale: float32, one element (shape ``[]`` or ``[1]``), positive and finite.
        x_zero_point: int32 or int64, one element, inside the code domain (0..255 for uint8
            codes and for a float input with ``x_quant_min >= 0``; -128..127 for int8 codes and
            for a float input with ``x_quant_min < 0``).
        w_packed: the weight codes in the blocked layout of :func:`pack_conv_weight`: int8
            ``[G, OCB, KH, KW, ICB, 16, 4]`` for ``w_bits=8``, uint8 ``[G, OCB, KH, KW, ICB,
            16, 2]`` (two int4 codes per byte) for ``w_bits=4``; ``G = groups``,
            ``OCB = ceil(OC / G / 16)``, ``ICB = ceil(C / G / 4)``.
        w_scale: float32 ``[OC]``, positive and finite; its length is the number of output
            channels ``OC`` (a multiple of ``groups``).
        bias: float32 ``[OC]`` or None.
        w_bits: 4 or 8, the width of the weight codes.
        stride, padding, dilation: an int (both spatial dims) or a pair ``(h, w)``; stride and
            dilation >= 1, padding >= 0 (zero padding: the code ``x_zero_point``).
        groups: >= 1, divides ``C`` and ``OC``.
        relu: apply ``max(., 0)`` to the output.
        x_quant_min, x_quant_max: the code range of a float ``x`` (``x_quant_min <
            x_quant_max``), inside 0..255, or inside -128..127 when ``x_quant_min < 0`` (e.g.
            [0, 255], [0, 15], [-8, 7]). Ignored when ``x`` holds codes.
        residual: float32, exactly the output's shape ``[N, OC, OH, OW]``, on ``x``'s device,
            added before relu (a residual connection). Any strides; contiguous and
            channels_last are read in place, others copied first.
        clamp_max: a finite value (rounded to float32), ``>= 0`` when ``relu``: the output is
            ``min(out, clamp_max)`` after relu. NaN stays NaN (as in ``torch.clamp``).
        out_scale, out_zero_point: requantize the output: ``out_scale`` float32, one element,
            positive and finite; ``out_zero_point`` (required with it) int32 or int64, one
            element, inside the code domain of the output (0..255 or -128..127).
        out_quant_min, out_quant_max: the code range of the output codes (``out_quant_min <=
            out_quant_max``), inside 0..255 (uint8 codes), or inside -128..127 when
            ``out_quant_min < 0`` (int8 codes). Ignored without ``out_scale``.

    Returns:
        float32 ``[N, OC, OH, OW]``, ``OH = (H + 2 * pad_h - dil_h * (KH - 1) - 1) // stride_h
        + 1`` (likewise OW), in ``x``'s memory format (channels_last in, channels_last out),
        on ``x``'s device. The output must not be empty (OH, OW >= 1). With ``out_scale``:
        the codes instead, uint8 (``out_quant_min >= 0``) or int8, ``[N, OC, OH, OW]`` in
        channels_last memory format whatever ``x``'s (the layout a consumer reads fastest); a
        NaN output value gives the code 0.

    Limits: every size derived from the arguments (dilated kernel, padded input, the padded
    code buffer, the output) must fit in int64, and the reduction length ``K = C / groups *
    KH * KW`` must satisfy ``K * 255 * max|w| <= 2**31 - 1`` (``max|w|`` = 128 for
    ``w_bits=8``, 8 for ``w_bits=4``), i.e. ``K <= 65793`` (8-bit weights) or ``K <= 1052688``
    (4-bit), so that the int32 accumulation is exact (``|u - x_zero_point| <= 255``).
    Larger arguments raise ValueError instead of wrapping.

    Not differentiable. On CPU the scales and the zero points are checked (a non-positive or
    non-finite scale, or a zero point outside the code domain, raises ValueError). On CUDA they
    are not read on the host (that would synchronize): an output channel whose ``w_scale`` is
    invalid comes out NaN, and the whole output when ``x_scale`` or ``x_zero_point`` is (relu
    and clamp_max keep the NaN); with code output an invalid ``out_scale`` or
    ``out_zero_point`` makes every value NaN, and so every code 0.
    """
    op = "qconv2d"
    return torch.ops.oqfl.qconv2d(
        x, x_scale, x_zero_point, w_packed, w_scale, bias,
        w_bits=w_bits, stride=_pair(op, "stride", stride), padding=_pair(op, "padding", padding),
        dilation=_pair(op, "dilation", dilation), groups=groups, relu=relu,
        x_quant_min=x_quant_min, x_quant_max=x_quant_max, residual=residual,
        clamp_max=clamp_max, out_scale=out_scale, out_zero_point=out_zero_point,
        out_quant_min=out_quant_min, out_quant_max=out_quant_max,
    )


def qlinear(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    w_bits: int,
    relu: bool = False,
    x_quant_min: int = 0,
    x_quant_max: int = 255,
    residual: Optional[Tensor] = None,
    clamp_max: Optional[float] = None,
    out_scale: Optional[Tensor] = None,
    out_zero_point: Optional[Tensor] = None,
    out_quant_min: int = 0,
    out_quant_max: int = 255,
) -> Tensor:
    """Integer linear layer: :func:`qconv2d` with a 1x1 kernel over the last dimension of ``x``.

    With ``u`` the activation codes and ``w`` the weight codes ``[OC, IC]``::

        u      = clamp(round_half_to_even(x / x_scale + x_zero_point), x_quant_min, x_quant_max)
        acc    = sum over i of u[..., i] * w[o, i]                      (int32)
        out    = float(acc - x_zero_point * sum_i w[o, i]) * (x_scale * w_scale[o]) + bias[o]
        then the epilogue of :func:`qconv2d`: + residual, relu, min(., clamp_max), and the
        codes when out_scale is given

    Args:
        x: ``[..., IC]`` (at least 1-D; any strides, copied when not contiguous): float32
            values, or uint8 / int8 codes, as in :func:`qconv2d`.
        x_scale, x_zero_point, x_quant_min, x_quant_max, w_bits, relu, clamp_max, out_scale,
            out_zero_point, out_quant_min, out_quant_max: as in :func:`qconv2d`.
        w_packed: the weight codes in the layout of :func:`pack_linear_weight`: int8
            ``[OCB, ICB, 16, 4]`` (``w_bits=8``) or uint8 ``[OCB, ICB, 16, 2]`` (``w_bits=4``),
            ``OCB = ceil(OC / 16)``, ``ICB = ceil(IC / 4)``.
        w_scale: float32 ``[OC]``, positive and finite.
        bias: float32 ``[OC]`` or None.
        residual: float32 ``[..., OC]`` (the output's shape, any strides) or None, added
            before relu.

    Returns:
        A contiguous float32 tensor ``[..., OC]`` on ``x``'s device (``[OC]`` for a 1-D
        ``x``); with ``out_scale`` the codes instead (contiguous uint8, or int8 when
        ``out_quant_min < 0``). Invalid scales and zero points are handled as in
        :func:`qconv2d`.

    Limits as in :func:`qconv2d` with ``K = IC``: ``IC <= 65793`` for ``w_bits=8``,
    ``IC <= 1052688`` for ``w_bits=4`` (``IC * 255 * max|w|`` must fit in int32).
    """
    return torch.ops.oqfl.qlinear(
        x, x_scale, x_zero_point, w_packed, w_scale, bias,
        w_bits=w_bits, relu=relu, x_quant_min=x_quant_min, x_quant_max=x_quant_max,
        residual=residual, clamp_max=clamp_max, out_scale=out_scale,
        out_zero_point=out_zero_point, out_quant_min=out_quant_min, out_quant_max=out_quant_max,
    )


def _check_weight_bits(op: str, bits: int) -> None:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{op}: bits expected 4 or 8, got {bits!r}")


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def conv_weight_layout_shape(out_channels: int, in_channels_per_group: int, kernel_size,
                             bits: int, groups: int = 1) -> Tuple[int, ...]:
    """Shape of :func:`pack_conv_weight`'s result: ``[G, ceil(OC/G/16), KH, KW, ceil(ICg/4),
    16, 4]`` for 8 bits, last dimension 2 for 4 bits."""
    kh, kw = kernel_size
    return (groups, _ceil_div(out_channels // groups, _OC_BLOCK), kh, kw,
            _ceil_div(in_channels_per_group, _IC_BLOCK), _OC_BLOCK,
            _IC_BLOCK if bits == 8 else _IC_BLOCK // 2)


def linear_weight_layout_shape(out_features: int, in_features: int,
                               bits: int) -> Tuple[int, ...]:
    """Shape of :func:`pack_linear_weight`'s result: ``[ceil(OC/16), ceil(IC/4), 16, 4]`` for
    8 bits, last dimension 2 for 4 bits."""
    shape = conv_weight_layout_shape(out_features, in_features, (1, 1), bits)
    return shape[1:2] + shape[4:]


def pack_conv_weight(codes: Tensor, bits: int, groups: int = 1) -> Tensor:
    """Signed weight codes ``[OC, IC / groups, KH, KW]`` in the blocked layout of
    :func:`qconv2d` (``csrc/qconv_args.h``).

    With ``G = groups``, ``OCg = OC / G``, ``ICg = IC / G``, ``OCB = ceil(OCg / 16)`` and
    ``ICB = ceil(ICg / 4)``, the int8 layout is::

        W[g, ob, kh, kw, cb, j, i] = codes[g * OCg + ob * 16 + j, cb * 4 + i, kh, kw]
        (0 where ob * 16 + j >= OCg or cb * 4 + i >= ICg),  shape [G, OCB, KH, KW, ICB, 16, 4]

    so one ``[16, 4]`` row (64 bytes) holds 4 input channels of 16 output channels: one
    AVX-512 VNNI operand, and per output channel one dp4a word. For ``bits=4`` the same elements
    are packed two per byte along each flattened 64-element row, element ``2k`` in the LOW nibble
    and ``2k + 1`` in the HIGH nibble of byte ``k``, as 4-bit two's complement (the nibble order
    of :func:`pack`, docs/DESIGN.md section 3): shape ``[G, OCB, KH, KW, ICB, 16, 2]`` uint8, byte
    ``[..., j, b]`` holding input channels ``2b`` (low) and ``2b + 1`` (high) of output
    channel ``j``. E.g. one output channel with the 1x1 codes ``[1, -2, 7]`` packs to the row
    ``[[1, -2, 7, 0], [0, 0, 0, 0], ...]`` (int8), or ``[[0xE1, 0x07], [0, 0], ...]`` (int4).

    Pure PyTorch (runs on any device, no custom op); the inverse is
    :func:`unpack_conv_weight`.

    Args:
        codes: integer tensor (any integer dtype, any device) ``[OC, IC / groups, KH, KW]``
            with values in the signed range of ``bits`` ([-128, 127] or [-8, 7]; checked, which
            reads the values).
        bits: 4 or 8.
        groups: the convolution's groups, >= 1, dividing ``OC``.

    Returns:
        A contiguous int8 (``bits=8``) or uint8 (``bits=4``) tensor on ``codes``' device.
    """
    return _pack_blocked("pack_conv_weight", codes, bits, groups, 4)


def _pack_blocked(op: str, codes: Tensor, bits: int, groups: int, dims: int) -> Tensor:
    _check_weight_bits(op, bits)
    if not isinstance(codes, Tensor):
        raise TypeError(f"{op}: codes expected a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{op}: codes expected an integer dtype, got {codes.dtype}")
    if codes.dim() != dims:
        what = "4 dimensions [OC, IC / groups, KH, KW]" if dims == 4 else "2 dimensions [OC, IC]"
        raise ValueError(f"{op}: codes expected {what}, got shape {list(codes.shape)}")
    if dims == 2:
        codes = codes[:, :, None, None]
    oc, icg, kh, kw = codes.shape
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or oc % groups:
        raise ValueError(f"{op}: groups expected a positive divisor of the output channels "
                         f"({oc}), got {groups!r}")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < qmin or hi > qmax:
            raise ValueError(f"{op}: codes expected values in [{qmin}, {qmax}] ({bits}-bit "
                             f"signed), got values in [{lo}, {hi}]")
    g = groups
    ocg = oc // g
    ocb, icb = _ceil_div(ocg, _OC_BLOCK), _ceil_div(icg, _IC_BLOCK)
    w = torch.zeros((g, ocb * _OC_BLOCK, icb * _IC_BLOCK, kh, kw), dtype=torch.int8,
                    device=codes.device)
    w[:, :ocg, :icg] = codes.reshape(g, ocg, icg, kh, kw).to(torch.int8)
    # [G, OCB, 16, ICB, 4, KH, KW] -> [G, OCB, KH, KW, ICB, 16, 4]
    w = w.reshape(g, ocb, _OC_BLOCK, icb, _IC_BLOCK, kh, kw).permute(0, 1, 5, 6, 3, 2, 4)
    w = w.contiguous()
    if bits == 8:
        return w
    # every block row has an even number of codes, so packing the flat tensor packs each row
    return pack(w.reshape(-1), 4).reshape(g, ocb, kh, kw, icb, _OC_BLOCK, _IC_BLOCK // 2)


def unpack_conv_weight(w_packed: Tensor, bits: int, out_channels: int,
                       in_channels_per_group: int) -> Tensor:
    """Inverse of :func:`pack_conv_weight` (which documents the layout).

    Args:
        w_packed: int8 ``[G, OCB, KH, KW, ICB, 16, 4]`` (``bits=8``) or uint8
            ``[G, OCB, KH, KW, ICB, 16, 2]`` (``bits=4``); ``G`` is the groups.
        bits: 4 or 8.
        out_channels: ``OC``, a multiple of ``G`` with ``OCB == ceil(OC / G / 16)``.
        in_channels_per_group: ``ICg`` with ``ICB == ceil(ICg / 4)``.

    Returns:
        Contiguous int8 codes ``[OC, ICg, KH, KW]`` on ``w_packed``'s device (the padding of
        the blocks is dropped, not checked).
    """
    return _unpack_blocked("unpack_conv_weight", w_packed, bits, out_channels,
                           in_channels_per_group, linear=False)


def _unpack_blocked(op: str, w_packed: Tensor, bits: int, oc: int, icg: int,
                    linear: bool) -> Tensor:
    _check_weight_bits(op, bits)
    want = torch.int8 if bits == 8 else torch.uint8
    if w_packed.dtype != want:
        raise TypeError(f"{op}: w_packed expected dtype {want} for {bits}-bit codes, got "
                        f"{w_packed.dtype}")
    row = _IC_BLOCK if bits == 8 else _IC_BLOCK // 2
    dims, lead = (4, "OCB, ICB") if linear else (7, "G, OCB, KH, KW, ICB")
    if w_packed.dim() != dims or tuple(w_packed.shape[-2:]) != (_OC_BLOCK, row):
        raise ValueError(f"{op}: w_packed expected shape [{lead}, {_OC_BLOCK}, {row}] for "
                         f"{bits}-bit codes, got shape {list(w_packed.shape)}")
    if linear:
        w_packed = w_packed[None, :, None, None]
    g, ocb, kh, kw, icb = w_packed.shape[:5]
    oc_name, ic_name = ("out_features", "in_features") if linear else \
        ("out_channels", "in_channels_per_group")
    if oc < 1 or oc % g or _ceil_div(oc // g, _OC_BLOCK) != ocb:
        per = f" / {g}" if not linear else ""
        raise ValueError(f"{op}: {oc_name} expected a positive count"
                         f"{'' if linear else f' divisible by the groups ({g})'} with "
                         f"ceil({oc_name}{per} / {_OC_BLOCK}) == OCB ({ocb}), got {oc}")
    if icg < 1 or _ceil_div(icg, _IC_BLOCK) != icb:
        raise ValueError(f"{op}: {ic_name} expected a count with "
                         f"ceil({ic_name} / {_IC_BLOCK}) == ICB ({icb}), got {icg}")
    if bits == 8:
        w = w_packed
    else:
        w = unpack(w_packed.contiguous().reshape(-1), 4, w_packed.numel() * 2).reshape(
            g, ocb, kh, kw, icb, _OC_BLOCK, _IC_BLOCK)
    # [G, OCB, KH, KW, ICB, 16, 4] -> [G, OCB, 16, ICB, 4, KH, KW]
    w = w.permute(0, 1, 5, 4, 6, 2, 3).reshape(g, ocb * _OC_BLOCK, icb * _IC_BLOCK, kh, kw)
    ocg = oc // g
    w = w[:, :ocg, :icg].reshape(oc, icg, kh, kw)
    return (w.reshape(oc, icg) if linear else w).contiguous()


def pack_linear_weight(codes: Tensor, bits: int) -> Tensor:
    """Signed weight codes ``[OC, IC]`` in the blocked layout of :func:`qlinear`.

    The layout of :func:`pack_conv_weight` for a 1x1 kernel with one group, without the unit
    dimensions: int8 ``[OCB, ICB, 16, 4]`` (``bits=8``) or uint8 ``[OCB, ICB, 16, 2]``
    (``bits=4``), ``OCB = ceil(OC / 16)``, ``ICB = ceil(IC / 4)``::

        W[ob, cb, j, i] = codes[ob * 16 + j, cb * 4 + i]   (0 past the edges)

    (int4: element ``2k`` of a flattened 64-element row in the low nibble of byte ``k``).

    Args:
        codes: integer tensor ``[OC, IC]`` with values in the signed range of ``bits``.
        bits: 4 or 8.

    Returns:
        A contiguous int8 (``bits=8``) or uint8 (``bits=4``) tensor on ``codes``' device.
    """
    w = _pack_blocked("pack_linear_weight", codes, bits, 1, 2)
    return w.reshape(w.shape[1], w.shape[4], w.shape[5], w.shape[6])


def unpack_linear_weight(w_packed: Tensor, bits: int, out_features: int,
                         in_features: int) -> Tensor:
    """Inverse of :func:`pack_linear_weight`: int8 codes ``[OC, IC]`` from ``[OCB, ICB, 16,
    4|2]`` (``out_features = OC``, ``in_features = IC``)."""
    return _unpack_blocked("unpack_linear_weight", w_packed, bits, out_features, in_features,
                           linear=True)
