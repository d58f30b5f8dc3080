"""Fake (meta) kernels: output shapes, dtypes and layouts without touching data.

They let torch.compile, FakeTensorMode and torch.export trace code that calls the ops. The
checks here are those that depend only on metadata; the C++ kernels repeat them (and check
values) because they also guard memory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_steps(op: str, shape, scale: Tensor, zero_point: Optional[Tensor],
                 axis: Optional[int], shape_name: str = "x.shape") -> None:
    """Axis against ``shape``, and the dtype and shape of scale/zero_point (StepTarget in C++)."""
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
    _check_steps(op, x.shape, scale, zero_point, axis)


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
    _check_args("fake_quant_backward", x, scale, zero_point, quant_min, quant_max, axis)
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
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed expected dtype uint8, got {packed.dtype}")
    nbytes = _packed_bytes(numel, bits)
    if packed.dim() != 1 or packed.shape[0] != nbytes:
        raise ValueError(f"{op}: packed expected shape [{nbytes}] ({numel} codes of {bits} bits), "
                         f"got shape {list(packed.shape)}")


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
    _check_packed("unpack_dequantize", packed, bits, numel)
    _check_steps("unpack_dequantize", shape, scale, zero_point, axis, shape_name="shape")
    return packed.new_empty(tuple(shape), dtype=torch.float32)
