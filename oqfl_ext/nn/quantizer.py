"""The learnable LSQ quantizer module (step size per tensor or per channel, optional offset)."""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._checks import check_int

__all__ = ["LSQQuantizer", "bit_range", "MIN_STEP", "MAX_STEP", "INIT_METHODS", "GRAD_COUNTS",
           "QUANT_DEFAULTS"]

# Safety bounds on the step size the op sees; they never bind in ordinary training.
MIN_STEP = 1e-8
MAX_STEP = 1e6
INIT_METHODS = ("mse", "lsq")
# what N_s of LSQ's gradient scale counts: every element sharing the step size in the batch
# ("all"), or those of one example (LSQ's paper for activations; axis 0 is the batch)
GRAD_COUNTS = ("all", "example")

#: The quantizers' defaults, in one place: quantize_model, the quantized layers,
#: oqfl_ext.fl.experiment.ExperimentConfig (so oqfl-fl, the Flower apps and
#: experiments/paper_grid.py) read them here. Chosen on a validation split carved from the
#: training images (docs/RESULTS.md, "How the defaults were chosen").
QUANT_DEFAULTS = {
    "init": "lsq",                # step-size initialization (LSQQuantizer's ``init``)
    "act_grad_count": "all",      # N_s of the input quantizers' gradient scale
    "first_last_bits": 8,         # bits of the first and last layer; "float" keeps them float
    "step_size_lr_scale": 0.1,    # the clients' step-size learning rate, a multiple of lr
}

# Error-minimizing initialization: candidate ranges k/K of the data's range, k = 1..K, with
# the error measured on an evenly strided sample of at most _INIT_SAMPLES elements (split
# evenly between the step sizes) and the candidates evaluated _INIT_CHUNK elements at a time:
# bounded time and memory whatever the tensor.
_INIT_CANDIDATES = 64
_INIT_SAMPLES = 1 << 16
_INIT_CHUNK = 1 << 22


def bit_range(bits, signed: bool, name: str = "bits") -> Tuple[int, int]:
    """``(quant_min, quant_max)`` of a ``bits``-bit integer code; ``bits`` must be 2..8."""
    try:
        if isinstance(bits, bool):
            raise TypeError
        b = operator.index(bits)
    except TypeError:
        raise ValueError(f"{name} expected an integer in 2..8, got {bits!r}") from None
    if not 2 <= b <= 8:
        raise ValueError(f"{name} expected an integer in 2..8, got {b}")
    if signed:
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


class _PositiveStep(torch.autograd.Function):
    """|step| bounded to [MIN_STEP, MAX_STEP] forward; the gradient of |step| backward.

    The gradient passes through the bounds (a straight-through clamp), so a step size that an
    optimizer drove to or past zero keeps receiving gradient and recovers; an infinite one is
    read as MAX_STEP. A NaN step stays NaN: the op then raises on CPU (or yields NaN on CUDA),
    since there is no meaningful value to substitute.
    """

    @staticmethod
    def forward(ctx, step: Tensor) -> Tensor:
        ctx.save_for_backward(step)
        return step.abs().clamp(MIN_STEP, MAX_STEP)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (step,) = ctx.saved_tensors
        return torch.where(step < 0, -grad, grad)


class LSQQuantizer(nn.Module):
    """Learned Step size Quantization (LSQ) fake quantizer, with an optional LSQ+ offset.

    ``forward(x)`` returns ``ops.fake_quant(x, s, z, ...)``: ``x`` rounded to the grid
    ``(q - z) * s`` for integer codes ``q`` in ``[quant_min, quant_max]``, differentiable in
    ``x`` (straight-through), in the step size ``s`` and in the offset ``z``.

    Args:
        bits: code width, 2..8.
        signed: ``True``: codes ``-2**(bits-1) .. 2**(bits-1)-1``; ``False``: ``0 .. 2**bits-1``;
            ``None``: chosen from the first batch (unsigned when it has no negative value,
            signed otherwise). The offset is used with signed codes only in that case.
        per_channel_axis: ``None`` for one step size, or the axis that gets one step size
            (and offset) per slice; ``num_channels`` must then give that axis' size.
        learn_offset: add a learnable float32 offset ``z`` in the integer domain (asymmetric
            ranges, LSQ+). Without it ``z`` is 0.
        num_channels: number of slices along ``per_channel_axis``.
        init: how the first batch sets the step size (see below): ``"mse"`` (default for a
            quantizer built alone) or ``"lsq"``; :func:`quantize_model` sets
            ``QUANT_DEFAULTS["init"]``.
        grad_factor: gradient scale of the step size and offset; ``None`` (default) is LSQ's
            ``1/sqrt(N_s * quant_max)`` (``ops.lsq_grad_factor``), ``N_s`` as ``grad_count``
            says.
        grad_count: what ``N_s`` counts: ``"all"`` (default): the elements per step size of
            the whole input; ``"example"``: those of one example, the input's axis 0 being the
            batch (LSQ's paper for activations: the scale then does not depend on the batch
            size).

    Initialization: a quantizer that was not loaded from a state_dict sets its parameters from
    the first non-empty batch it sees (in training or eval mode), without gradient:

    * ``"mse"``: the step size minimizing the squared quantization error of that batch among
      the ranges ``k/64`` of the batch's range (``max|x|`` signed, ``max x`` unsigned,
      ``max x - min x`` with an offset), k = 1..64, per step size; the error is measured on
      every ``ceil(numel / 65536)``-th element of each slice (all of them in small tensors).
    * ``"lsq"``: LSQ's ``2 * mean|x| / sqrt(quant_max)`` per step size.

    With an offset, ``z`` starts at ``round(quant_min - lo * (quant_max - quant_min) / (hi - lo))``
    with ``lo = min(x, 0)`` and ``hi = max(x, 0)`` of the batch: the code of 0 when ``[lo, hi]``
    spans the codes, rounded so that 0 is exactly representable.

    The buffers ``initialized`` and ``signed`` record that state and are part of the state_dict:
    loading a state_dict with ``initialized`` set skips the initialization.

    Positivity: the parameter ``step_size`` is free (any optimizer may push it anywhere); the
    op receives ``|step_size|`` bounded to ``[MIN_STEP, MAX_STEP]`` (see :meth:`quant_params`),
    with the gradient of ``|step_size|`` flowing through the bounds, so the step size in use is
    always positive and finite (a NaN parameter is reported by the op instead of hidden).

    ``enabled = False`` makes the module the identity (no initialization either).

    Under ``torch.compile``, the first batch of a quantizer with ``signed=None`` cannot be
    inspected while tracing; such a quantizer then takes signed codes (with the offset when
    ``learn_offset``). Run one batch eagerly first (e.g. ``oqfl_ext.nn.calibrate``) to get the
    data-driven choice.
    """

    def __init__(self, bits: int, signed: Optional[bool], per_channel_axis: Optional[int] = None,
                 learn_offset: bool = False, *, num_channels: Optional[int] = None,
                 init: str = "mse", grad_factor: Optional[float] = None,
                 grad_count: str = "all", device=None):
        super().__init__()
        if signed is not None and not isinstance(signed, bool):
            raise ValueError(f"signed expected True, False or None, got {signed!r}")
        bit_range(bits, True)  # validates bits
        if init not in INIT_METHODS:
            raise ValueError(f"init expected one of {INIT_METHODS}, got {init!r}")
        if grad_count not in GRAD_COUNTS:
            raise ValueError(f"grad_count expected one of {GRAD_COUNTS}, got {grad_count!r}")
        if grad_count == "example" and per_channel_axis == 0:
            raise ValueError("grad_count='example' expected a per_channel_axis other than 0 "
                             "(axis 0 is the batch)")
        if per_channel_axis is None:
            if num_channels is not None:
                raise ValueError("num_channels expected None for a per-tensor quantizer "
                                 f"(per_channel_axis=None), got {num_channels!r}")
            shape: Tuple[int, ...] = (1,)
        else:
            check_int("per_channel_axis", per_channel_axis, allow_none=True)
            check_int("num_channels (with per_channel_axis)", num_channels, minimum=1)
            shape = (num_channels,)
        if grad_factor is not None and not float(grad_factor) > 0:
            raise ValueError(f"grad_factor expected None or a positive number, got {grad_factor!r}")

        self.bits = int(bits)
        self.per_channel_axis = per_channel_axis
        self.num_channels = num_channels
        self.learn_offset = bool(learn_offset)
        self.init = init
        self.grad_factor = None if grad_factor is None else float(grad_factor)
        self.grad_count = grad_count
        self.enabled = True
        self._fixed_signed = signed

        self.step_size = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        if self.learn_offset:
            self.offset = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        else:
            self.register_parameter("offset", None)
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self.register_buffer("signed", torch.tensor(bool(signed), device=device))
        # Python mirrors of the buffers, so forward branches without reading a tensor
        # (no device sync, nothing data-dependent under torch.compile).
        self._initialized = False
        self._signed: Optional[bool] = signed

    # ------------------------------------------------------------------ properties

    @property
    def is_signed(self) -> Optional[bool]:
        """Whether the codes are signed (None: not yet decided, ``signed=None`` before data)."""
        return self._signed

    @property
    def uses_offset(self) -> bool:
        """Whether ``offset`` enters the op (an auto-signed quantizer uses it when signed)."""
        return self.learn_offset and (self._fixed_signed is not None or bool(self._signed))

    @property
    def quant_min(self) -> int:
        return bit_range(self.bits, self._code_signed())[0]

    @property
    def quant_max(self) -> int:
        return bit_range(self.bits, self._code_signed())[1]

    def _code_signed(self) -> bool:
        if self._signed is None:
            raise RuntimeError("LSQQuantizer(signed=None) has not seen data yet: its code "
                               "range is chosen by the first batch")
        return self._signed

    def is_initialized(self) -> bool:
        return self._initialized

    def extra_repr(self) -> str:
        signed = {None: "auto", True: "signed", False: "unsigned"}[self._fixed_signed]
        if self._fixed_signed is None and self._signed is not None:
            signed += f" ({'signed' if self._signed else 'unsigned'})"
        parts = [f"bits={self.bits}", signed]
        if self.per_channel_axis is not None:
            parts.append(f"per_channel_axis={self.per_channel_axis}, "
                         f"num_channels={self.num_channels}")
        if self.learn_offset:
            parts.append("learn_offset=True")
        parts.append(f"init={self.init!r}")
        if self.grad_count != "all":
            parts.append(f"grad_count={self.grad_count!r}")
        if not self.enabled:
            parts.append("enabled=False")
        if not self._initialized:
            parts.append("uninitialized")
        return ", ".join(parts)

    # ------------------------------------------------------------------ the quantizer

    def quant_params(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(scale, zero_point)`` as passed to the op: the positive, finite step size in use
        (differentiable in ``step_size``) and the offset (None when not used), float32."""
        scale = _PositiveStep.apply(self.step_size.float())
        zero_point = self.offset.float() if self.uses_offset else None
        return scale, zero_point

    def op_kwargs(self, x: Tensor) -> dict:
        """The keyword arguments of ``ops.fake_quant`` for input ``x``."""
        if self.grad_factor is not None:
            g = self.grad_factor
        else:
            n = x.numel()
            if self.per_channel_axis is not None and n:
                n //= x.shape[self.per_channel_axis]
            if self.grad_count == "example" and x.dim() > 1 and n:
                n //= x.shape[0]
            g = ops.lsq_grad_factor(n, self.quant_max)
        return dict(quant_min=self.quant_min, quant_max=self.quant_max,
                    axis=self.per_channel_axis, grad_factor=g)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("LSQQuantizer: input expected a floating-point tensor, got "
                            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
        ax = self.per_channel_axis
        if ax is not None:
            if not -x.dim() <= ax < x.dim() or x.shape[ax] != self.num_channels:
                raise ValueError(
                    f"LSQQuantizer: input expected {self.num_channels} slices along axis {ax}, "
                    f"got shape {list(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        self._check_input(x)
        if not self._initialized and x.numel() > 0:
            self.initialize(x)
        if self._signed is None:  # auto-signed, uninitialized, empty batch: nothing to decide
            return x
        scale, zero_point = self.quant_params()
        return ops.fake_quant(x, scale, zero_point, **self.op_kwargs(x))

    # ------------------------------------------------------------------ initialization

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the step size (and offset) from the batch ``x`` as described in the class
        docstring, and mark the quantizer initialized."""
        self._check_input(x)
        if x.numel() == 0:
            raise ValueError("LSQQuantizer.initialize: x expected a non-empty tensor")
        x = x.detach().float()
        if self.per_channel_axis is None:
            rows = x.reshape(1, -1)
        else:
            rows = x.movedim(self.per_channel_axis, 0).reshape(self.num_channels, -1)
        if self._fixed_signed is None:
            if torch.compiler.is_compiling():
                signed = True  # the data cannot be inspected while tracing (class docstring)
            else:
                signed = bool(rows.amin() < 0)
        else:
            signed = self._fixed_signed
        self._signed = signed
        use_offset = self.uses_offset
        qmin, qmax = bit_range(self.bits, signed)

        lo = rows.amin(dim=1).clamp(max=0)
        hi = rows.amax(dim=1).clamp(min=0)
        if use_offset:
            span = hi - lo  # the range [lo, hi] spread over all the codes
            offset = torch.round(qmin - lo * (qmax - qmin) / span.clamp(min=MIN_STEP))
            offset = offset.clamp(qmin, qmax)
            full = span / (qmax - qmin)
        else:
            offset = None
            full = (torch.maximum(-lo, hi) if signed else hi) / qmax
        if self.init == "lsq":
            step = 2 * rows.abs().mean(dim=1) / qmax ** 0.5
        else:
            step = self._search_step(rows, full, offset, qmin, qmax)
        self.step_size.copy_(step.clamp(MIN_STEP, MAX_STEP).reshape(self.step_size.shape))
        if offset is not None:
            self.offset.copy_(offset.reshape(self.offset.shape))
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._initialized = True

    def _search_step(self, rows: Tensor, full: Tensor, offset: Optional[Tensor],
                     qmin: int, qmax: int) -> Tensor:
        """Per row, the step size among ``full * k/K`` (k = 1..K) with the least squared
        quantization error, evaluated by the op itself on a strided sample of the row."""
        channels, n = rows.shape
        stride = max(1, -(-n * channels // _INIT_SAMPLES))
        sample = rows[:, ::stride]
        m = sample.shape[1]
        fractions = torch.arange(1, _INIT_CANDIDATES + 1, device=rows.device,
                                 dtype=torch.float32) / _INIT_CANDIDATES
        candidates = (fractions[:, None] * full[None, :]).clamp(MIN_STEP, MAX_STEP)  # [K, C]
        per_chunk = max(1, _INIT_CHUNK // (channels * m))
        errors = []
        for k0 in range(0, _INIT_CANDIDATES, per_chunk):
            steps = candidates[k0:k0 + per_chunk]                  # [k, C]
            k = steps.shape[0]
            xk = sample.expand(k, channels, m).reshape(k * channels, m)
            zk = None if offset is None else offset.expand(k, channels).reshape(-1)
            y = ops.fake_quant(xk, steps.reshape(-1).contiguous(), zk, quant_min=qmin,
                               quant_max=qmax, axis=0)
            errors.append((y - xk).square().sum(dim=1).reshape(k, channels))
        best = torch.cat(errors).argmin(dim=0)                     # first minimum: smallest range
        return candidates.gather(0, best[None, :]).squeeze(0)

    # ------------------------------------------------------------------ state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key_init, key_signed = prefix + "initialized", prefix + "signed"
        if key_init not in state_dict:
            return
        initialized = bool(state_dict[key_init])
        signed = bool(state_dict[key_signed]) if key_signed in state_dict else self._signed
        if initialized and self._fixed_signed is not None and signed != self._fixed_signed:
            error_msgs.append(
                f"{key_signed}: the state_dict has {'signed' if signed else 'unsigned'} codes, "
                f"this quantizer was built with signed={self._fixed_signed}")
            return
        self._initialized = initialized
        if self._fixed_signed is None:
            self._signed = signed if initialized else None
