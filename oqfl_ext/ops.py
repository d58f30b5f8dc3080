"""Typed public wrappers around the ``torch.ops.oqfl`` custom ops.

The ops themselves are defined in ``csrc/registration.cpp`` (schemas), implemented in
``csrc/cpu`` and ``csrc/cuda``, given fake (meta) kernels in ``oqfl_ext._meta`` and autograd
formulas in ``oqfl_ext._autograd``. These wrappers only document and forward; every check that
guards memory lives in C++, so calling ``torch.ops.oqfl.*`` directly is equally safe.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["fake_quant", "fake_quant_backward", "lsq_grad_factor", "pack", "unpack",
           "quantize_pack", "unpack_dequantize", "cpu_capability"]


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
        scale: float32 step sizes, positive and finite. ``axis=None``: one value, shape ``[]``
            or ``[1]``. Otherwise ``x.shape[axis]`` values (shape ``[C]``).
        zero_point: optional float32 offset in the integer domain, same shape rules as
            ``scale``. ``None`` means 0. Non-integer values are allowed (LSQ+).
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

    The layout (``csrc/common/bitpack.h``, DESIGN.md section 3) is the same on every device and
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
    element ``i`` (row-major) then gets ``u = splitmix64(splitmix64(seed) + (i + 1) *
    0x9E3779B97F4A7C15) >> 40`` times ``2**-24``. The codes are therefore a pure function of
    the seed: the same on CPU and CUDA for the same seed and independent of the thread count.

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
    """The CPU code path the kernels use: ``"avx512"``, ``"avx2"`` or ``"default"``.

    Chosen at load time from the CPU; ``OQFL_CPU_CAPABILITY`` (or PyTorch's
    ``ATEN_CPU_CAPABILITY``) set to one of these names lowers it, never raises it above what
    the CPU supports.
    """
    return torch.ops.oqfl._cpu_capability()
