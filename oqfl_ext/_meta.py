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


def _check_args(op: str, x: Tensor, scale: Tensor, zero_point: Optional[Tensor],
                quant_min: int, quant_max: int, axis: Optional[int]) -> None:
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: x expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if quant_min >= quant_max:
        raise ValueError(f"{op}: quant_min expected less than quant_max ({quant_max}), got {quant_min}")
    if axis is not None and not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"{op}: axis expected an integer in [{-x.dim()}, {x.dim()}) for x of shape "
            f"{list(x.shape)}, got {axis}")
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} expected dtype float32, got {t.dtype}")
        if axis is None:
            if t.numel() != 1 or t.dim() > 1:
                raise ValueError(f"{op}: {name} expected a single value (shape [] or [1]) when "
                                 f"axis is None, got shape {list(t.shape)}")
        elif t.dim() != 1 or t.shape[0] != x.shape[axis]:
            raise ValueError(f"{op}: {name} expected shape [{x.shape[axis]}] (x.shape[{axis}] "
                             f"values), got shape {list(t.shape)}")


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
