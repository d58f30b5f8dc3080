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

__all__ = ["fake_quant", "fake_quant_backward", "lsq_grad_factor", "cpu_capability"]


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


def cpu_capability() -> str:
    """The CPU code path the kernels use: ``"avx512"``, ``"avx2"`` or ``"default"``.

    Chosen at load time from the CPU; ``OQFL_CPU_CAPABILITY`` (or PyTorch's
    ``ATEN_CPU_CAPABILITY``) set to one of these names lowers it, never raises it above what
    the CPU supports.
    """
    return torch.ops.oqfl._cpu_capability()
