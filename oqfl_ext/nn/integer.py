"""Conversion of a quantization-aware-trained model to integer inference, and its packed file.

* :class:`QConv2dInt`, :class:`QLinearInt`: inference layers holding packed integer weights
  (the blocked layout of ``csrc/qconv_args.h``) whose forward is ``oqfl_ext.ops.qconv2d`` /
  ``oqfl_ext.ops.qlinear``.
* :func:`convert`: replace every :class:`QuantConv2d` / :class:`QuantLinear` of a model by its
  integer twin, and (default) fuse the model's graph around them ("The fused graph" below).
* :func:`save_packed` / :func:`load_packed`: one safetensors file (no pickle) holding the
  compact weight codes, the scales, zero points, biases and every other tensor of the model,
  with a JSON description of the architecture in its metadata.

What :func:`convert` computes, per quantized layer:

* weight codes ``q_w = clamp(round_half_even(w / s_w), qmin, qmax)`` with the layer's weight
  quantizer (per output channel step ``s_w``, the value its forward uses), ``w_scale = s_w``.
  The codes are exactly the ones the fake-quant layer uses, so ``q_w * s_w`` is its weight.
  Weight codes of 2..4 bits are stored in the int4 layout (``w_bits = 4``), 5..8 bits in the
  int8 layout (``w_bits = 8``): a 2- or 3-bit layer is exact, it merely takes 4 bits per weight.
* input codes: the op quantizes the float input itself,
  ``u = clamp(round_half_even(x / x_scale + x_zero_point), x_quant_min, x_quant_max)`` with
  ``x_scale`` the input quantizer's step size and ``[x_quant_min, x_quant_max]`` its code range
  (signed codes in the -128..127 domain, unsigned in 0..255; any width 2..8 works).
* zero point: the op's zero point is an integer (so that a padding tap, a real 0, is exactly a
  code), while an LSQ+ input quantizer (signed inputs) learns a float offset ``z``. ``convert``
  uses ``x_zero_point = round_half_even(z)``. **Consequence**: when ``z`` is not an integer, the
  converted layer quantizes its input on the grid ``(k - round(z)) * s`` instead of the
  fake-quant grid ``(k - z) * s``: the two grids are shifted by ``(z - round(z)) * s`` (at most
  half a step), each input element may land on a code one step away from the fake-quant one
  (an input difference of at most ``s``) and the clamping range moves by the same shift. The
  outputs then differ slightly from the fake-quant model's (predictions almost always agree).
  Unsigned inputs (e.g. after a ReLU) have no offset and are exact; with integer offsets (e.g.
  fresh from initialization, or rounded with ``offset.data.round_()`` before the last epochs
  of training) the converted model computes the same codes as the fake-quant model, and its
  outputs differ only by float rounding (the integer accumulation is exact).

The fused graph (``convert(model)``, :mod:`oqfl_ext.nn.graph` for the patterns):

* BatchNorm folding. A ``BatchNorm2d`` (eval: running statistics) right after an integer
  convolution, ``bn(conv(x)) = f * (conv(x) + b - mean) + beta`` with the per-channel factor
  ``f = gamma / sqrt(running_var + eps)``, is folded exactly into the per-output-channel steps:
  ``w_scale' = w_scale * |f|``, ``bias' = (b - mean) * f + beta`` (computed in float64, stored
  in float32); the weight codes do not change, except that a channel with ``f < 0`` has its
  codes negated (the op takes ``w_scale > 0``) and a channel with ``f = 0`` (the constant
  ``beta``) zero codes. The most negative code ``-2**(b-1)`` has no negation in ``b`` bits:
  such a layer stores ``code_bits = b + 1`` (2- and 3-bit weights stay in the int4
  container, 4..7-bit ones move to the int8 one). An 8-bit layer with a negated ``-128``
  cannot be folded: that BatchNorm stays a float module after the layer, and the
  ConversionWarning names it.
* Epilogue. A residual add, then a ReLU / ReLU6, after an integer layer become the op's
  fused epilogue: ``v = acc * x_scale * w_scale' + bias'``, ``v += residual`` (the other
  operand of the add, float32), ``relu``, ``min(v, clamp_max)``. The fake-quant model adds the
  two float tensors, so adding the float operand keeps the graph exact w.r.t. it (requantizing
  both operands to a common grid would not); the residual is not quantized.
* Codes between layers. A layer whose only consumer is an integer layer (through max pooling
  and flatten, exact on codes) writes that consumer's input codes
  ``clamp(round_half_even(v / x_scale_c + x_zero_point_c), x_quant_min_c, x_quant_max_c)``:
  the consumer's own quantization of the same float value, so no float tensor exists between
  them. Everything else (the logits, average pooling, a float or fake-quant layer, a tensor
  read by two layers or by a residual add) gets float32.

Exactness: every integer layer computes its documented arithmetic exactly (integer
accumulation; then the float32 epilogue, each operation rounded once). Against the fake-quant
model, with integer zero points, the codes are the same except where float rounding (the
folded scale and bias, another order of the same float operations) moves a value that lies
within a few float32 ulps of a rounding tie of the next quantizer (in code units: within about
``1e-3`` of ``k + 0.5`` at the sizes tested); such a code differs by one, and the difference
propagates to the layers after it. Where all the codes of a sample agree, its outputs differ by
float32 rounding only (about ``1e-5`` of their scale at the sizes tested).

Layers that cannot be converted stay fake-quant layers (their forward is unchanged) and
:func:`convert` emits one :class:`ConversionWarning` naming them and why: a float side
(``weight_bits`` or ``act_bits`` None), a disabled quantizer (``enabled = False``), or an offset
that rounds outside the op's code domain. A layer whose input quantizer has never seen data
(so its code range and step size are undefined) is an error: calibrate first
(:func:`oqfl_ext.nn.calibrate`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from .._io import atomic_write_bytes, encode_safetensors, tensor_bytes, tensor_digest
from .layers import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer, bit_range
from .._checks import check_int

__all__ = ["QConv2dInt", "QLinearInt", "convert", "save_packed", "load_packed",
           "ConversionWarning", "PACKED_FORMAT", "PACKED_VERSION"]

PACKED_FORMAT = "oqfl_ext.packed_model"
PACKED_VERSION = 2

class ConversionWarning(UserWarning):
    """Some layers of the model stay fake-quant layers after :func:`convert`."""


def _storage_bits(weight_bits: int) -> int:
    """The packed container of a ``weight_bits``-bit code: int4 for 2..4, int8 for 5..8."""
    bit_range(weight_bits, True, "weight_bits")
    return 4 if weight_bits <= 4 else 8


def _code_domain(signed: bool) -> Tuple[int, int]:
    return (-128, 127) if signed else (0, 255)


# Counts changes to integer layers (a new attribute or buffer, a move with .to()): a C++ plan
# built before a change holds the old tensors and is rebuilt (oqfl_ext/nn/plan.py).
_layer_changes = 0


def layer_changes() -> int:
    return _layer_changes


def _changed() -> None:
    global _layer_changes
    _layer_changes += 1


class _QIntBase(nn.Module):
    """Buffers and the quantization configuration shared by the integer layers.

    Buffers: ``w_packed`` (blocked weight layout, int8 for ``w_bits`` 8 / uint8 for 4),
    ``w_scale`` (float32 [OC]), ``bias`` (float32 [OC] or None), ``x_scale`` (float32 [1]),
    ``x_zero_point`` (int32 [1]). Configuration (plain attributes, so that forward never reads a
    tensor on the host): ``weight_bits`` (the trained code width), ``code_bits`` (the width
    of the stored codes: ``weight_bits``, or one more where a folded BatchNorm negated a channel
    holding the most negative code), ``w_bits`` (their container, 4 or 8), ``act_bits``,
    ``act_signed``, ``x_quant_min``, ``x_quant_max``.

    Epilogue (what a fused graph folds into the layer, :func:`convert`; all off by default):
    ``residual`` (forward takes a float ``residual`` of the output's shape, added after the
    bias), ``relu``, ``clamp_max`` (``min(., clamp_max)`` after the relu), ``input_codes`` (the
    input is the code tensor its producer wrote: uint8 for unsigned inputs, int8 for signed),
    ``out_quant`` (``(min, max)``: the output is the codes
    ``clamp(round_half_even(v / out_scale + out_zero_point), min, max)``, uint8 when
    ``min >= 0`` else int8, with the buffers ``out_scale`` (float32 [1]) and
    ``out_zero_point`` (int32 [1]); None: float32 output).
    """

    _quant_type: type  # the fake-quant layer a subclass converts

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        _changed()

    def register_buffer(self, name, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        _changed()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _changed()
        return out

    def _pack_weight(self, codes: Tensor) -> Tensor:
        """The weight codes in the subclass' blocked layout."""
        raise NotImplementedError

    @staticmethod
    def _code_bits(weight_bits: int, code_bits: Optional[int]) -> int:
        bit_range(weight_bits, True, "weight_bits")
        if code_bits is None:
            return int(weight_bits)
        if code_bits not in (weight_bits, weight_bits + 1):
            raise ValueError(f"code_bits expected weight_bits ({weight_bits}) or one more, got "
                             f"{code_bits!r}")
        bit_range(code_bits, True, "code_bits")
        return int(code_bits)

    def _init_quant(self, out_channels: int, packed_shape, weight_bits: int, act_bits: int,
                    act_signed: bool, bias: bool, device, code_bits: int,
                    epilogue: dict) -> None:
        if not isinstance(act_signed, bool):
            raise ValueError(f"act_signed expected True or False, got {act_signed!r}")
        self.weight_bits = int(weight_bits)
        self.code_bits = code_bits
        self.w_bits = _storage_bits(code_bits)
        self.act_bits = int(act_bits)
        self.act_signed = act_signed
        self.x_quant_min, self.x_quant_max = bit_range(act_bits, act_signed, "act_bits")
        dtype = torch.uint8 if self.w_bits == 4 else torch.int8
        self.register_buffer("w_packed", torch.zeros(packed_shape, dtype=dtype, device=device))
        self.register_buffer("w_scale", torch.ones(out_channels, dtype=torch.float32,
                                                   device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32,
                                                     device=device))
        else:
            self.register_buffer("bias", None)
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("x_zero_point", torch.zeros(1, dtype=torch.int32, device=device))
        self._init_epilogue(device, **epilogue)

    def _init_epilogue(self, device, relu: bool = False, clamp_max: Optional[float] = None,
                       residual: bool = False, input_codes: bool = False,
                       out_quant: Optional[Tuple[int, int]] = None) -> None:
        for name, v in (("relu", relu), ("residual", residual), ("input_codes", input_codes)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} expected True or False, got {v!r}")
        if clamp_max is not None:
            if isinstance(clamp_max, bool) or not isinstance(clamp_max, (int, float)) or \
                    not 0 < clamp_max < math.inf:
                raise ValueError(f"clamp_max expected None or a positive finite number, got "
                                 f"{clamp_max!r}")
            clamp_max = float(clamp_max)
        self.relu, self.clamp_max, self.residual = relu, clamp_max, residual
        self.input_codes = input_codes
        self.out_quant_min = self.out_quant_max = None
        if out_quant is not None:
            ok = (isinstance(out_quant, (tuple, list)) and len(out_quant) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in out_quant))
            lo, hi = out_quant if ok else (0, 0)
            dom = _code_domain(lo < 0)
            if not ok or not dom[0] <= lo < hi <= dom[1]:
                raise ValueError("out_quant expected None or (min, max) codes, min < max, "
                                 f"inside 0..255 or -128..127, got {out_quant!r}")
            self.out_quant_min, self.out_quant_max = lo, hi
            self.register_buffer("out_scale", torch.ones(1, dtype=torch.float32,
                                                         device=device))
            self.register_buffer("out_zero_point", torch.zeros(1, dtype=torch.int32,
                                                               device=device))

    @property
    def out_quant(self) -> Optional[Tuple[int, int]]:
        return None if self.out_quant_min is None else (self.out_quant_min, self.out_quant_max)

    def epilogue(self) -> dict:
        """The epilogue configuration (the keyword arguments of the constructor)."""
        return dict(relu=self.relu, clamp_max=self.clamp_max, residual=self.residual,
                    input_codes=self.input_codes, out_quant=self.out_quant)

    def _quant_repr(self) -> str:
        bits = f"weight_bits={self.weight_bits}"
        if self.code_bits != self.weight_bits:
            bits += f" (codes {self.code_bits} bits)"
        if self.w_bits != self.code_bits:
            bits += f" (stored as int{self.w_bits})"
        s = (f"{bits}, act_bits={self.act_bits}, "
             f"act={'signed' if self.act_signed else 'unsigned'} "
             f"[{self.x_quant_min}, {self.x_quant_max}]")
        for key, v in self.epilogue().items():
            if v:
                s += f", {key}={v}"
        return s

    def _prepare_call(self, op, **geometry) -> None:
        """Fix what every forward passes to ``op`` (the registered ``torch.ops.oqfl.qconv2d`` /
        ``qlinear``): its keyword arguments that differ from the op schema's defaults
        (``geometry``: the subclass' shape arguments, in the op's types), built once here
        because the layer's configuration does not change after construction.

        Per-call Python cost matters (at batch 1 a small layer's kernel takes tens of
        microseconds, and the dispatcher's parsing grows with every keyword passed): forward
        reads the buffers from ``_buffers`` rather than through ``nn.Module.__getattr__``,
        passes only these keywords, and skips the argument-normalizing wrappers of
        :mod:`oqfl_ext.ops` (the op checks every argument itself)."""
        defaults = {a.name: a.default_value for a in op.default._schema.arguments
                    if a.has_default_value()}
        kwargs = dict(geometry, w_bits=self.w_bits, x_quant_min=self.x_quant_min,
                      x_quant_max=self.x_quant_max, relu=self.relu, clamp_max=self.clamp_max,
                      out_quant_min=self.out_quant_min, out_quant_max=self.out_quant_max)
        if self.out_quant_min is None:
            del kwargs["out_quant_min"], kwargs["out_quant_max"]
        self._op = op.default
        self._op_kwargs = {k: v for k, v in kwargs.items()
                           if k not in defaults or v != defaults[k]}
        self._codes_dtype = torch.int8 if self.act_signed else torch.uint8

    def _input(self, x: Tensor) -> Tuple[Tensor, Optional[torch.dtype]]:
        """x for the op, and the float dtype to cast the output back to (None: keep)."""
        if not self.input_codes:
            return self._as_float32(x)
        if not isinstance(x, Tensor) or x.dtype is not self._codes_dtype:
            raise TypeError(f"{type(self).__name__}: input expected {self._codes_dtype} codes "
                            "(the layer takes the codes its producer writes), got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        return x, None

    def _run(self, x: Tensor, residual: Optional[Tensor], dtype) -> Tensor:
        """The op (:meth:`_prepare_call`) on ``x`` with the epilogue."""
        if self.residual != (residual is not None):
            raise ValueError(f"{type(self).__name__}: residual expected "
                             f"{'a tensor' if self.residual else 'None'} (the layer was built "
                             f"with residual={self.residual}), got "
                             f"{'None' if residual is None else 'a tensor'}")
        kwargs = self._op_kwargs
        if residual is not None:
            if not isinstance(residual, Tensor) or not residual.is_floating_point():
                raise TypeError(f"{type(self).__name__}: residual expected a floating-point "
                                "tensor")
            kwargs = dict(kwargs, residual=residual.float())
        b = self._buffers
        if self.out_quant_min is not None:
            kwargs = dict(kwargs, out_scale=b["out_scale"], out_zero_point=b["out_zero_point"])
            dtype = None   # the output is codes
        y = self._op(x, b["x_scale"], b["x_zero_point"], b["w_packed"], b["w_scale"], b["bias"],
                     **kwargs)
        return y if dtype is None else y.to(dtype)

    @classmethod
    def from_quant(cls, module):
        """The integer twin of a :class:`QuantConv2d` (:class:`QConv2dInt`) or
        :class:`QuantLinear` (:class:`QLinearInt`); see :func:`convert` for what it takes from
        the layer and what it requires."""
        if not isinstance(module, cls._quant_type):
            raise TypeError(f"{cls.__name__}.from_quant: module expected a "
                            f"{cls._quant_type.__name__}, got {type(module).__name__}")
        reason = _unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_quant: cannot convert this layer: {reason}")
        codes, w_scale, x_scale, zp = _quant_values(module)
        q = cls.from_float_layout(module, weight_bits=module.weight_bits,
                                  act_bits=module.act_bits,
                                  act_signed=bool(module.act_quantizer.is_signed))
        q._set_quant_values(w_scale, module.bias, x_scale, zp, q._pack_weight(codes))
        return q

    def _set_quant_values(self, w_scale: Tensor, bias: Optional[Tensor],
                          x_scale: Tensor, x_zero_point: int, packed: Tensor) -> None:
        if tuple(packed.shape) != tuple(self.w_packed.shape) or packed.dtype != \
                self.w_packed.dtype:
            raise RuntimeError(f"{type(self).__name__}: the packed weight has shape "
                               f"{list(packed.shape)} {packed.dtype}, expected "
                               f"{list(self.w_packed.shape)} {self.w_packed.dtype}")
        dev = self.w_packed.device
        self.w_packed = packed.to(dev)
        self.w_scale = w_scale.detach().to(dev, torch.float32).reshape(-1).clone()
        if bias is not None:
            self.bias = bias.detach().to(dev, torch.float32).reshape(-1).clone()
        self.x_scale = x_scale.detach().to(dev, torch.float32).reshape(1).clone()
        self.x_zero_point = torch.tensor([x_zero_point], dtype=torch.int32, device=dev)

    @staticmethod
    def _as_float32(x: Tensor) -> Tuple[Tensor, Optional[torch.dtype]]:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("input expected a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dtype == torch.float32:
            return x, None
        return x.float(), x.dtype


class QConv2dInt(_QIntBase):
    """Integer inference twin of :class:`QuantConv2d`: ``forward(x, residual=None)`` is
    ``oqfl_ext.ops.qconv2d`` with the layer's packed weight codes, per-output-channel weight
    scales, input scale / integer zero point / code range, float bias and epilogue
    (:class:`_QIntBase`; a plain twin has none).

    Build one with :meth:`from_quant` (or :func:`convert`); the constructor makes an empty
    layer of the given configuration (zero weights) to load a state into.

    The input is float (float32; other float dtypes are computed in float32 and the result is
    cast back), quantized inside the op exactly like the fake-quant layer's input quantizer with
    its zero point rounded to an integer (module docstring of ``oqfl_ext.nn.integer``), or, with
    ``input_codes``, the codes themselves. The output is float32 ``[N, OC, OH, OW]``, or its
    codes (channels_last) with ``out_quant``. ``padding_mode`` other than ``"zeros"`` and string
    paddings that need asymmetric padding pad the float input first (as ``nn.Conv2d`` does),
    then run the op without padding (such a layer cannot take codes). Not differentiable:
    inference only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, weight_bits: int, act_bits: int, act_signed: bool,
                 code_bits: Optional[int] = None, device=None, **epilogue):
        super().__init__()
        # an nn.Conv2d validates the geometry and computes the string paddings for us
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, padding_mode, device="meta")
        self.in_channels, self.out_channels = ref.in_channels, ref.out_channels
        self.kernel_size, self.stride = ref.kernel_size, ref.stride
        self.padding, self.dilation, self.groups = ref.padding, ref.dilation, ref.groups
        self.padding_mode = ref.padding_mode
        self._reversed_padding_repeated_twice = list(ref._reversed_padding_repeated_twice)
        g = self.groups
        icg = self.in_channels // g
        kh, kw = self.kernel_size
        code_bits = self._code_bits(weight_bits, code_bits)
        shape = ops.conv_weight_layout_shape(self.out_channels, icg, (kh, kw),
                                             _storage_bits(code_bits), g)
        self._init_quant(self.out_channels, shape, weight_bits, act_bits, act_signed, bias,
                         device, code_bits, epilogue)
        # how forward pads: by the op (ints) or beforehand in float (any other case)
        padding = (0, 0) if self.padding == "valid" else self.padding
        self._prepad = self.padding_mode != "zeros" or isinstance(padding, str)
        # the geometry as the registered op takes it (int lists; nn.Conv2d checked it)
        self._op_padding = [0, 0] if self._prepad else [int(p) for p in padding]
        self._op_stride = [int(v) for v in self.stride]
        self._op_dilation = [int(v) for v in self.dilation]
        if self._prepad and self.input_codes:
            raise ValueError("input_codes expected False for a layer that pads its float input "
                             f"itself (padding={self.padding!r}, padding_mode="
                             f"{self.padding_mode!r})")
        self._prepare_call(torch.ops.oqfl.qconv2d, stride=self._op_stride,
                           padding=self._op_padding, dilation=self._op_dilation,
                           groups=self.groups)

    @classmethod
    def from_float_layout(cls, module: nn.Conv2d, *, weight_bits: int, act_bits: int,
                          act_signed: bool, bias: Optional[bool] = None,
                          **kwargs) -> "QConv2dInt":
        """An empty layer with ``module``'s geometry (used to rebuild a saved model); ``bias``
        defaults to whether ``module`` has one; ``kwargs``: ``code_bits`` and the epilogue."""
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   stride=module.stride, padding=module.padding, dilation=module.dilation,
                   groups=module.groups,
                   bias=module.bias is not None if bias is None else bias,
                   padding_mode=module.padding_mode, weight_bits=weight_bits,
                   act_bits=act_bits, act_signed=act_signed, device=module.weight.device,
                   **kwargs)

    def takes_codes(self) -> bool:
        """Whether the layer can take code input (not when it pads its input itself)."""
        return not self._prepad

    _quant_type = QuantConv2d

    def _pack_weight(self, codes: Tensor) -> Tensor:
        return ops.pack_conv_weight(codes, self.w_bits, self.groups)

    def weight_codes(self) -> Tensor:
        """The int8 weight codes ``[OC, IC / groups, KH, KW]`` (unpacked from ``w_packed``)."""
        return ops.unpack_conv_weight(self.w_packed, self.w_bits, self.out_channels,
                                      self.in_channels // self.groups)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        x, dtype = self._input(x)
        if self._prepad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        if not self.input_codes and x.dim() == 4 and \
                not x.is_contiguous(memory_format=torch.channels_last):
            # the op writes its output in its input's memory format: a float input is made
            # channels_last once (the network's first layer), so every float tensor after it
            # is too (max pooling and the fused residual reads are several times faster so)
            x = x.contiguous(memory_format=torch.channels_last)
        return self._run(x, residual, dtype)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ", " + self._quant_repr()


class QLinearInt(_QIntBase):
    """Integer inference twin of :class:`QuantLinear`: ``forward(x, residual=None)`` is
    ``oqfl_ext.ops.qlinear`` on ``x [..., in_features]`` (float, quantized inside the op as in
    :class:`QConv2dInt`, or codes), output float32 ``[..., out_features]`` (or its codes), with
    the epilogue of :class:`_QIntBase`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_bits: int, act_bits: int, act_signed: bool,
                 code_bits: Optional[int] = None, device=None, **epilogue):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_int(name, v, minimum=1)
        self.in_features, self.out_features = in_features, out_features
        code_bits = self._code_bits(weight_bits, code_bits)
        shape = ops.linear_weight_layout_shape(out_features, in_features,
                                               _storage_bits(code_bits))
        self._init_quant(out_features, shape, weight_bits, act_bits, act_signed, bias, device,
                         code_bits, epilogue)
        self._prepare_call(torch.ops.oqfl.qlinear)

    @classmethod
    def from_float_layout(cls, module: nn.Linear, *, weight_bits: int, act_bits: int,
                          act_signed: bool, bias: Optional[bool] = None,
                          **kwargs) -> "QLinearInt":
        """An empty layer with ``module``'s shape (used to rebuild a saved model); ``bias`` and
        ``kwargs`` as in :meth:`QConv2dInt.from_float_layout`."""
        return cls(module.in_features, module.out_features,
                   bias=module.bias is not None if bias is None else bias,
                   weight_bits=weight_bits, act_bits=act_bits, act_signed=act_signed,
                   device=module.weight.device, **kwargs)

    def takes_codes(self) -> bool:
        return True

    _quant_type = QuantLinear

    def _pack_weight(self, codes: Tensor) -> Tensor:
        return ops.pack_linear_weight(codes, self.w_bits)

    def weight_codes(self) -> Tensor:
        """The int8 weight codes ``[out_features, in_features]``."""
        return ops.unpack_linear_weight(self.w_packed, self.w_bits, self.out_features,
                                        self.in_features)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        x, dtype = self._input(x)
        return self._run(x, residual, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._quant_repr())


# ----------------------------------------------------------------------------------------------
# convert

def _unsupported_reason(m) -> Optional[str]:
    """Why the fake-quant layer ``m`` cannot become an integer layer (None: it can)."""
    if m.weight_quantizer is None:
        return "float weights (weight_bits=None)"
    if m.act_quantizer is None:
        return "float inputs (act_bits=None)"
    if not m.weight_quantizer.enabled or not m.act_quantizer.enabled:
        return "a disabled quantizer (enabled=False): the layer computes in float"
    aq = m.act_quantizer
    if aq.is_initialized() and aq.uses_offset:
        zp = torch.round(aq.quant_params()[1].detach()).item()
        lo, hi = _code_domain(bool(aq.is_signed))
        if not lo <= zp <= hi:
            return (f"its input offset {aq.offset.item():.4g} rounds to {zp:.0f}, outside the "
                    f"op's code domain [{lo}, {hi}]")
    return None


@torch.no_grad()
def _quant_values(m) -> Tuple[Tensor, Tensor, Tensor, int]:
    """(int8 weight codes, weight scales [OC], input scale [1], integer zero point)."""
    wq, aq = m.weight_quantizer, m.act_quantizer
    if not aq.is_initialized():
        raise ValueError("its input quantizer has not seen data, so its step size and code "
                         "range are undefined: run a batch through the model first "
                         "(oqfl_ext.nn.calibrate(model, x)) or load a trained state_dict")
    weight = m.weight.detach()
    if not wq.is_initialized():  # what the layer's own first forward would do
        wq.initialize(weight)
    w_scale, _ = wq.quant_params()
    w_scale = w_scale.detach().float()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    # the op's arithmetic (quant_math.h quantize_code): float32 x / s, round half to even
    codes = torch.clamp(torch.round(weight.float() / w_scale.reshape(shape)),
                        wq.quant_min, wq.quant_max).to(torch.int8)
    x_scale, z = aq.quant_params()
    zp = 0 if z is None else int(torch.round(z.detach()).item())
    return codes, w_scale, x_scale.detach().float(), zp


class _NoFold(Exception):
    """A BatchNorm that cannot be folded exactly (the message says why)."""


@torch.no_grad()
def _fold_batchnorm(codes: Tensor, w_scale: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d,
                    weight_bits: int, code_bits: int) -> Tuple[Tensor, Tensor, Tensor, int]:
    """(codes, w_scale, bias, code_bits) of ``bn(conv(x))`` (module docstring of
    ``oqfl_ext.nn.integer``, "BatchNorm folding"). Raises _NoFold."""
    var = bn.running_var.detach().double()
    f = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        f = f * bn.weight.detach().double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(f)
    b = bias.detach().double() if bias is not None else torch.zeros_like(f)
    new_bias = (b - bn.running_mean.detach().double()) * f + beta
    neg, zero = f < 0, f == 0
    codes = codes.clone()
    lo = bit_range(code_bits, True)[0]
    if bool(neg.any()) and bool((codes[neg] == lo).any()):
        # -lo does not fit in code_bits: one more bit (an int8 container holds 5..8 bits)
        if code_bits == 8:
            raise _NoFold("a channel with a negative BatchNorm factor holds the weight code "
                          "-128, whose negation does not fit in int8")
        code_bits += 1
    codes[neg] = -codes[neg]
    codes[zero] = 0   # gamma = 0: the channel is the constant beta (= new_bias)
    scale = w_scale.detach().double() * f.abs()
    scale[zero] = w_scale.detach().double()[zero]
    scale, new_bias = scale.float(), new_bias.float()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()) or \
            not bool(torch.isfinite(new_bias).all()):
        raise _NoFold("the folded weight scales or bias are not positive and finite in float32")
    return codes, scale, new_bias, code_bits


_INT_TWINS = ((QuantConv2d, QConv2dInt), (QuantLinear, QLinearInt))


def _int_twin(m) -> Optional[type]:
    for quant, twin in _INT_TWINS:
        if isinstance(m, quant):
            return twin
    return None


def _zoo_source(model: nn.Module) -> Optional[dict]:
    """``{"model": name, "kwargs": {...}}`` when ``model`` is a zoo model, else None."""
    from .. import models
    if type(model) not in models.MODELS.values():
        return None
    try:
        name, kwargs = _zoo_constructor(model)
    except ValueError:
        return None
    return {"model": name, "kwargs": kwargs}


def convert(model: nn.Module, inplace: bool = False, fuse: Optional[bool] = None) -> nn.Module:
    """Turn a model trained with :class:`QuantConv2d` / :class:`QuantLinear` (e.g. by
    :func:`oqfl_ext.quantize_model` and QAT) into an integer inference model.

    Every ``QuantConv2d`` / ``QuantLinear`` (any ``weight_bits`` and ``act_bits`` in 2..8)
    becomes a :class:`QConv2dInt` / :class:`QLinearInt` holding its packed weight codes,
    weight scales, bias, input scale and integer zero point (computed as described in the
    docstring of this module: the codes the fake-quant layer uses; the LSQ+ input offset
    rounded to an integer).

    With ``fuse`` (the default unless ``inplace``), the model is traced with ``torch.fx``
    (:mod:`oqfl_ext.nn.graph`) and the result is an :class:`oqfl_ext.nn.graph.IntegerGraph`
    (an ``fx.GraphModule``; the integer layers keep their names, e.g.
    ``result.get_submodule("layer1.0.conv1")``) in which every BatchNorm2d that follows an
    integer convolution is folded into it, every ReLU / ReLU6 and residual add that follows an
    integer layer is fused into its epilogue, and a layer whose only consumer is an integer
    layer (directly or through max pooling / flatten) writes that consumer's input codes
    (module docstring, "The fused graph"). On a float32 CPU input its forward runs as one C++
    plan of those layers, bit for bit what the graph's Python forward computes, without Python
    between the layers (:mod:`oqfl_ext.nn.plan`; ``result.plan_status()`` says whether it runs,
    ``result.run_plan = False`` turns it off). A model that cannot be traced is converted layer
    by layer instead, with a :class:`ConversionWarning` saying why.

    Without ``fuse`` the quantized layers are swapped one by one in the model itself: its own
    ``forward`` runs, BatchNorm, activations, pooling and float layers stay as they are.

    Layers with a float side (``weight_bits=None`` or ``act_bits=None``), a disabled quantizer,
    or an input offset outside the op's code domain stay fake-quant layers; one
    :class:`ConversionWarning` lists them with the reason (and any BatchNorm that could not be
    folded: module docstring).

    Args:
        model: the trained model (a module tree, or a single QuantConv2d/QuantLinear, whose
            converted twin is then returned).
        inplace: modify ``model`` itself instead of a deep copy (layer by layer: a fused graph
            is a new module, so ``fuse=True`` with ``inplace=True`` is a ValueError).
        fuse: build the fused integer graph (default: ``not inplace``).

    Returns:
        The converted model, in eval mode (conversion is for inference; batch norm uses its
        running statistics, dropout is the identity).

    Raises:
        ValueError: a layer's input quantizer has not been initialized (calibrate first).
    """
    from . import graph as fx_graph
    if not isinstance(model, nn.Module):
        raise TypeError(f"model expected an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool) or fuse is not None and not isinstance(fuse, bool):
        raise TypeError("inplace and fuse expected True or False (fuse also None), got "
                        f"{inplace!r} and {fuse!r}")
    if fuse is None:
        fuse = not inplace
    if fuse and inplace:
        raise ValueError("convert: fuse=True builds a new module (a fused graph), so it cannot "
                         "be inplace; pass fuse=False to convert layer by layer in place")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if _int_twin(model) is not None:
        reason = _unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"convert: the layer cannot be converted: {reason}")
        return _int_twin(model).from_quant(model).eval()
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if name and _int_twin(m) is not None]
    twins: Dict[int, nn.Module] = {}   # id(fake-quant layer) -> its plain integer twin
    kept: List[str] = []
    for name, m in targets:
        if id(m) in twins:
            continue
        reason = _unsupported_reason(m)
        if reason is not None:
            kept.append(f"{name} ({type(m).__name__}: {reason})")
            twins[id(m)] = m
            continue
        try:
            twins[id(m)] = _int_twin(m).from_quant(m)
        except ValueError as e:
            raise ValueError(f"convert: layer {name!r}: {e}") from None
    gm = None
    if fuse and any(isinstance(t, _QIntBase) for t in twins.values()):
        source = _zoo_source(model)
        try:
            gm = fx_graph.trace(model)
        except fx_graph.GraphUnsupported as e:
            warnings.warn(f"convert: {e}; converting layer by layer instead (BatchNorm, "
                          "activations and residual adds stay float)", ConversionWarning,
                          stacklevel=2)
    if gm is None:
        for name, m in targets:
            new = twins[id(m)]
            if new is not m:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
    else:
        model = _convert_graph(model, gm, twins, source, kept)
    if kept:
        warnings.warn("convert: these layers stay fake-quant (float) layers: "
                      + "; ".join(kept), ConversionWarning, stacklevel=2)
    return model.eval()


def _convert_graph(model: nn.Module, gm, twins: Dict[int, nn.Module], source: Optional[dict],
                   kept: List[str]) -> nn.Module:
    """The IntegerGraph of ``model`` traced as ``gm`` (``twins``: convert's plain integer
    twins; ``kept`` gets the BatchNorms that stay float)."""
    from . import graph as fx_graph
    named = dict(model.named_modules())
    plain = {name: twins[id(m)] for name, m in named.items()
             if id(m) in twins and isinstance(twins[id(m)], _QIntBase)}
    folded: Dict[str, tuple] = {}

    def can_fold(conv: str, bn: str) -> bool:
        t = plain[conv]
        try:
            folded[conv] = _fold_batchnorm(t.weight_codes(), t.w_scale, t.bias,
                                           named[bn], t.weight_bits, t.code_bits)
        except _NoFold as e:
            kept.append(f"{bn} (BatchNorm2d after {conv}: not folded, {e})")
            return False
        return True

    fusions = fx_graph.plan(gm, set(plain), can_fold, lambda n: plain[n].takes_codes())
    for name, f in fusions.items():
        t = plain[name]
        codes, w_scale, bias, code_bits = folded.get(name) or (
            t.weight_codes(), t.w_scale, t.bias, t.code_bits)
        out = plain[f.out_codes] if f.out_codes else None
        new = type(t).from_float_layout(
            named[name], weight_bits=t.weight_bits, act_bits=t.act_bits,
            act_signed=t.act_signed, bias=bias is not None, code_bits=code_bits,
            **_epilogue_kwargs(f, out))
        new._set_quant_values(w_scale, bias, t.x_scale, int(t.x_zero_point.item()),
                              new._pack_weight(codes))
        if out is not None:
            new.out_scale = out.x_scale.clone()
            new.out_zero_point = out.x_zero_point.clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return fx_graph.IntegerGraph(model, gm.graph, source, fusions)


def _epilogue_kwargs(f, out: Optional[_QIntBase]) -> dict:
    """The integer layer's epilogue arguments for Fusion ``f`` (``out``: the consumer whose
    input codes it writes)."""
    return dict(relu=f.relu, clamp_max=f.clamp_max, residual=f.residual,
                input_codes=f.input_codes,
                out_quant=None if out is None else (out.x_quant_min, out.x_quant_max))


# ----------------------------------------------------------------------------------------------
# the packed file

_ZOO_KWARGS = {
    # model name -> function(model) -> the constructor keywords beyond in/num_classes/image_size
    "small_cnn": lambda m: {"width": m.features[0][0].out_channels},
    "vgg": lambda m: {"width": m.features[0][0].out_channels,
                      "hidden": m.classifier[0].out_features},
    "resnet20": lambda m: {"blocks_per_stage": len(m.layer1)},
    "mobilenet_v2": lambda m: {"last_channels": m.features[-1][0].out_channels},
}


def _zoo_constructor(model: nn.Module) -> Tuple[str, dict]:
    """(name, kwargs) of ``oqfl_ext.models.create`` that builds ``model``'s float skeleton."""
    from .. import models
    names = {cls: name for name, cls in models.MODELS.items()}
    name = names.get(type(model))
    if name is None or name not in _ZOO_KWARGS:
        raise ValueError(
            f"save_packed: cannot describe a {type(model).__name__} without pickle: only models "
            f"of oqfl_ext.models ({', '.join(sorted(_ZOO_KWARGS))}, built with "
            "oqfl_ext.models.create or their classes; quantized with quantize_model and/or "
            "converted with convert) can be saved")
    kwargs = dict(in_channels=model.in_channels, num_classes=model.num_classes,
                  image_size=model.image_size)
    try:
        kwargs.update(_ZOO_KWARGS[name](model))
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"save_packed: the {type(model).__name__} does not have the structure "
                         f"of oqfl_ext.models.{type(model).__name__} ({e})") from None
    return name, kwargs


def _layer_record(m, fusion=None) -> Optional[dict]:
    if isinstance(m, _QIntBase):
        from .graph import Fusion
        return {"kind": "int", "weight_bits": m.weight_bits, "act_bits": m.act_bits,
                "act_signed": m.act_signed, "code_bits": m.code_bits,
                "fusion": (fusion or Fusion()).to_json()}
    if isinstance(m, (QuantConv2d, QuantLinear)):
        return {"kind": "fake_quant", "weight_bits": m.weight_bits, "act_bits": m.act_bits,
                "act_signed": m.act_signed,
                "enabled": [q is None or q.enabled
                            for q in (m.weight_quantizer, m.act_quantizer)]}
    return None


_RECORD_KEYS = {"int": {"kind", "weight_bits", "act_bits", "act_signed", "code_bits", "fusion"},
                "fake_quant": {"kind", "weight_bits", "act_bits", "act_signed", "enabled"}}


def _check_record(lname: str, rec, m: nn.Module):
    """The validated record of layer ``lname`` (``m``: the structure's module of that name):
    (kind, weight_bits, act_bits, act_signed, code_bits, Fusion or None, enabled)."""
    from .graph import Fusion
    if not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, _QIntBase):
        raise ValueError(f"architecture layer {lname!r}: the model has no Conv2d/Linear of "
                         "that name")
    if not isinstance(rec, dict):
        raise ValueError(f"architecture layer {lname!r}: expected an object")
    kind = rec.get("kind")
    if kind not in _RECORD_KEYS:
        raise ValueError(f"architecture layer {lname!r}: kind {kind!r} is not 'int' or "
                         "'fake_quant'")
    if set(rec) != _RECORD_KEYS[kind]:
        raise ValueError(f"architecture layer {lname!r}: expected keys "
                         f"{sorted(_RECORD_KEYS[kind])}, got {sorted(rec)}")
    wb, ab, sg = rec["weight_bits"], rec["act_bits"], rec["act_signed"]
    for key, v in (("weight_bits", wb), ("act_bits", ab)):
        if not (v is None and kind == "fake_quant") and (
                not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8):
            raise ValueError(f"architecture layer {lname!r}: {key} {v!r} is not a bit width "
                             "2..8")
    if kind == "int" and not isinstance(sg, bool):
        raise ValueError(f"architecture layer {lname!r}: act_signed {sg!r} is not a bool")
    if kind == "fake_quant" and sg is not None and not isinstance(sg, bool):
        raise ValueError(f"architecture layer {lname!r}: act_signed {sg!r} is not a bool or "
                         "null")
    if isinstance(m, (QuantConv2d, QuantLinear)):
        # the caller's structure is itself quantized: its configuration must be the file's
        for key, v in (("weight_bits", wb), ("act_bits", ab)):
            if getattr(m, key) != v:
                raise ValueError(f"layer {lname!r}: the model has {key}={getattr(m, key)!r}, "
                                 f"the file {v!r}")
        if m.act_signed is not None and m.act_signed != sg:
            raise ValueError(f"layer {lname!r}: the model has act_signed={m.act_signed!r}, the "
                             f"file {sg!r}")
    if kind == "fake_quant":
        en = rec["enabled"]
        if not (isinstance(en, list) and len(en) == 2 and all(isinstance(e, bool) for e in en)):
            raise ValueError(f"architecture layer {lname!r}: enabled {en!r} is not two bools")
        return kind, wb, ab, sg, None, None, en
    cb, fj = rec["code_bits"], rec["fusion"]
    if not isinstance(cb, int) or isinstance(cb, bool) or cb not in (wb, wb + 1) or cb > 8:
        raise ValueError(f"architecture layer {lname!r}: code_bits {cb!r} is not weight_bits "
                         "or one more (at most 8)")
    fields = set(Fusion.__dataclass_fields__)
    if not isinstance(fj, dict) or set(fj) != fields:
        raise ValueError(f"architecture layer {lname!r}: fusion expected keys {sorted(fields)}")
    return kind, wb, ab, sg, cb, Fusion(**fj), None


def _structure(arch: dict, model: Optional[nn.Module], where: str) -> nn.Module:
    """The model ``arch`` describes, built on the zoo's skeleton or on (a copy of) the caller's
    ``model``, with every state tensor allocated (values arbitrary): the integer and
    fake-quant layers of the records and, for a graph, the fused graph, which must be the one
    the file records. Raises ValueError for any description it cannot build."""
    from .. import models
    from . import graph as fx_graph
    keys = {"model", "kwargs", "layers", "graph", "state"}
    if not isinstance(arch, dict) or set(arch) != keys:
        raise ValueError(f"architecture expected keys {sorted(keys)}, got "
                         f"{sorted(arch) if isinstance(arch, dict) else type(arch).__name__}")
    name, kwargs, layers = arch["model"], arch["kwargs"], arch["layers"]
    if not isinstance(arch["graph"], bool) or not isinstance(layers, dict):
        raise ValueError("architecture graph expected a bool and layers an object")
    source = None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model expected an nn.Module, got {type(model).__name__}")
        model = copy.deepcopy(model)
    elif name is None:
        raise ValueError("the file describes no oqfl_ext.models architecture (it was saved "
                         "from another model): build the same model structure (e.g. the "
                         "quantize_model'd float model) and pass it: load_packed(path, "
                         "model=...)")
    if name is not None:
        if name not in _ZOO_KWARGS or name not in models.MODELS:
            raise ValueError(f"architecture names model {name!r}, expected one of "
                             f"{sorted(_ZOO_KWARGS)}")
        _check_kwargs(name, kwargs)
        source = {"model": name, "kwargs": kwargs}
        if model is None:
            try:
                model = models.create(name, **kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"architecture: models.create({name!r}, **{kwargs}) failed: "
                                 f"{e}") from None
    elif kwargs is not None:
        raise ValueError("architecture kwargs expected null without a model name")
    base = dict(model.named_modules())
    recs = {lname: _check_record(lname, rec, base.get(lname)) for lname, rec in layers.items()}
    missing = [n for n, m in base.items() if isinstance(m, (QuantConv2d, QuantLinear))
               and n not in recs]
    if missing:
        raise ValueError(f"layers {missing[:5]} of the model are quantized, the file has no "
                         "record of them (a different model?)")
    ints: Dict[str, _QIntBase] = {}
    for lname, (kind, wb, ab, sg, cb, fusion, en) in recs.items():
        m = base[lname]
        try:
            if kind == "fake_quant":
                quant = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
                new = quant.from_float(m, weight_bits=wb, act_bits=ab, act_signed=sg)
                for q, e in zip((new.weight_quantizer, new.act_quantizer), en):
                    if q is not None:
                        q.enabled = e
            else:
                twin = QConv2dInt if isinstance(m, nn.Conv2d) else QLinearInt
                new = ints[lname] = twin.from_float_layout(m, weight_bits=wb, act_bits=ab,
                                                           act_signed=sg, code_bits=cb)
        except ValueError as e:
            raise ValueError(f"architecture layer {lname!r}: {e}") from None
        if not arch["graph"] or kind == "fake_quant":
            parent, _, child = lname.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    if not arch["graph"]:
        if any(f != type(f)() for *_, f, _ in recs.values() if f is not None):
            raise ValueError("architecture: fused layers in a file without a graph")
        return model.eval()
    try:
        gm = fx_graph.trace(model.eval())
    except fx_graph.GraphUnsupported as e:
        raise ValueError(f"the file holds a fused graph, but {e}") from None
    want = {lname: r[5] for lname, r in recs.items() if r[0] == "int"}
    got = fx_graph.plan(gm, set(ints), lambda conv, bn: want[conv].bn == bn,
                        lambda n: ints[n].takes_codes())
    for lname in want:
        if got[lname] != want[lname]:
            diff = {k: (v, getattr(got[lname], k)) for k, v in want[lname].to_json().items()
                    if getattr(got[lname], k) != v}
            raise ValueError(f"the model's fused graph does not match the file's: layer "
                             f"{lname!r}: (file, model) {diff}")
    for lname, f in got.items():
        t, m = ints[lname], base[lname]
        out = ints[f.out_codes] if f.out_codes else None
        new = type(t).from_float_layout(
            m, weight_bits=t.weight_bits, act_bits=t.act_bits, act_signed=t.act_signed,
            bias=m.bias is not None or f.bn is not None, code_bits=t.code_bits,
            **_epilogue_kwargs(f, out))
        parent, _, child = lname.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return fx_graph.IntegerGraph(model, gm.graph, source, got).eval()


def _check_kwargs(name: str, kwargs) -> None:
    """ValueError unless ``kwargs`` are arguments of ``models.create(name)`` within
    :data:`oqfl_ext.models.ARGUMENT_RANGES`."""
    from .. import models
    if not isinstance(kwargs, dict):
        raise ValueError(f"architecture kwargs expected an object, got {type(kwargs).__name__}")
    try:
        models.check_arguments(name, kwargs)
    except ValueError as e:
        raise ValueError(f"architecture kwargs: {e}") from None


def _check_file_size(arch: dict, blobs: Dict[str, Tensor], where: str) -> None:
    """ValueError unless the tensors can hold the model ``arch`` describes, checked from the
    description alone (nothing is built): every Conv2d/Linear weight takes at least 4 bits
    (int4 codes), every BatchNorm2d at least 2 bytes for each of its 4 per-channel entries
    (weight, bias, running mean and variance) and 8 bytes for its batch count."""
    from .. import models
    if not isinstance(arch, dict) or not isinstance(arch.get("model"), str):
        return  # _build says what is wrong
    name, kwargs = arch["model"], arch.get("kwargs")
    if name not in _ZOO_KWARGS:
        return
    try:
        _check_kwargs(name, kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    need = sum(-(-n // 2) if kind in ("conv", "linear") else 8 * n + 8
               for kind, n in models.layer_sizes(name, **kwargs))
    have = sum(t.numel() * t.element_size() for t in blobs.values())
    if have < need:
        raise ValueError(f"{where}: the architecture ({name} with {kwargs}) needs at least "
                         f"{need} bytes of tensors, the file holds {have}")


def _check_values(model: nn.Module, state: Dict[str, Tensor], where: str) -> None:
    """ValueError naming the first floating-point entry of ``state`` (of ``model``) with a NaN
    or infinite value, or a BatchNorm running variance with a negative one: such a model
    computes garbage (a NaN BatchNorm statistic gives one constant output for every input)."""
    variances = {f"{n}.running_var" for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for key, t in state.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: entry {key!r} has non-finite values (NaN or infinity)")
        if key in variances and bool((t < 0).any()):
            raise ValueError(f"{where}: entry {key!r} has negative values (a variance)")


def _describe(model: nn.Module, source: Optional[dict]) -> dict:
    """The architecture record of ``model`` (module docstring of :func:`save_packed`)."""
    from .graph import IntegerGraph
    fusions = model.fusions if isinstance(model, IntegerGraph) else {}
    layers = {}
    for lname, m in model.named_modules():
        rec = _layer_record(m, fusions.get(lname))
        if rec is not None:
            layers[lname] = rec
    return {"model": None if source is None else source["model"],
            "kwargs": None if source is None else source["kwargs"],
            "graph": isinstance(model, IntegerGraph), "layers": layers,
            "state": [[key, blob, list(shape)] for key, blob, shape in _manifest(model)]}


def _int_layers(model: nn.Module) -> Dict[str, _QIntBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QIntBase)}


def _codes_nbytes(m: _QIntBase) -> int:
    if isinstance(m, QConv2dInt):
        kh, kw = m.kernel_size
        n = m.out_channels * (m.in_channels // m.groups) * kh * kw
    else:
        n = m.out_features * m.in_features
    return -(-n * m.w_bits // 8)


def _blob_dtype(blob: str) -> Optional[torch.dtype]:
    if blob == "codes":
        return torch.uint8
    dtype = getattr(torch, blob[len("state."):], None) if blob.startswith("state.") else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _manifest(model: nn.Module) -> List[Tuple[str, str, Tuple[int, ...]]]:
    """The file's content in order: (key, blob, shape). The blocked ``w_packed`` of an integer
    layer is replaced by its compact codes (key ``<layer>.w_codes``, ``[bytes]``)."""
    packed_keys = {f"{n}.w_packed": m for n, m in _int_layers(model).items()}
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if key in packed_keys:
            out.append((key[:-len("w_packed")] + "w_codes", "codes",
                        (_codes_nbytes(packed_keys[key]),)))
        else:
            out.append((key, "state." + str(t.dtype).replace("torch.", ""), tuple(t.shape)))
    return out


def _digest(meta: Dict[str, str], blobs: Dict[str, Tensor]) -> str:
    return tensor_digest(b"oqfl-packed-model-digest", meta,
                         {k: (str(t.dtype), list(t.shape), tensor_bytes(t))
                          for k, t in blobs.items()})


def _blobs(model: nn.Module) -> Dict[str, Tensor]:
    """The tensors of the file: one flat tensor per blob, the entries concatenated in order."""
    ints = _int_layers(model)
    state = model.state_dict()
    parts: Dict[str, List[Tensor]] = {}
    for key, blob, shape in _manifest(model):
        if blob == "codes":
            m = ints[key[:-len(".w_codes")]]
            t = ops.pack(m.weight_codes().cpu().contiguous(), m.w_bits)
        else:
            t = state[key].detach().cpu()
        t = t.reshape(-1)
        if t.numel() != math.prod(shape):  # pragma: no cover - internal invariant
            raise RuntimeError(f"save_packed: {key}: {t.numel()} values, expected {shape}")
        parts.setdefault(blob, []).append(t)
    return {blob: torch.cat(ts).contiguous() for blob, ts in parts.items()}


def save_packed(model: nn.Module, path) -> None:
    """Save an integer model in one compact safetensors file (no pickle).

    ``model`` is any model converted with :func:`convert` (a fused
    :class:`~oqfl_ext.nn.graph.IntegerGraph` or a layer-by-layer conversion), or a model
    quantized with :func:`oqfl_ext.quantize_model` (converted first, on a copy: ``model`` is
    not modified, so a trained QAT model can be saved directly), or a float model. A model of
    :mod:`oqfl_ext.models` (built by ``oqfl_ext.models.create`` or its class, unmodified) is
    described by its constructor, so :func:`load_packed` rebuilds it alone; any other model
    (an ``nn.Sequential``, torchvision's, a modified zoo model) is loaded into a structure the
    caller builds: ``load_packed(path, model=...)``.

    File format (``PACKED_FORMAT`` version ``PACKED_VERSION``): docs/DESIGN.md section 4.7. One
    safetensors file, no pickle: the compact weight codes in one blob, every other state entry
    in one blob per dtype, and JSON metadata describing the architecture (the zoo constructor
    or none, whether the graph is fused, each layer's bits and fusion, the state manifest).

    Python attributes outside the state (train mode, hooks) are not saved; the loaded model is
    in eval mode.

    Raises:
        ValueError: a zoo model's constructor argument is outside
            ``oqfl_ext.models.ARGUMENT_RANGES``, or a floating-point entry of its state is NaN
            or infinite or a BatchNorm running variance negative (the message names the
            entry). Nothing is written then.
    """
    from .graph import IntegerGraph
    if not isinstance(model, nn.Module):
        raise TypeError(f"model expected an nn.Module, got {type(model).__name__}")
    source = model.source if isinstance(model, IntegerGraph) else _zoo_source(model)
    if source is not None:
        try:
            _check_kwargs(source["model"], source["kwargs"])
        except ValueError as e:
            raise ValueError(f"save_packed: {e}") from None
    _check_values(model, model.state_dict(), "save_packed")
    if any(_int_twin(m) is not None and _unsupported_reason(m) is None
           for m in model.modules()):
        model = convert(model)
    arch = _describe(model, source)
    blobs = _blobs(model)

    def metadata() -> Dict[str, str]:
        meta = {"format": PACKED_FORMAT, "version": str(PACKED_VERSION),
                "architecture": json.dumps(arch, separators=(",", ":"), sort_keys=True)}
        meta["digest"] = _digest(meta, blobs)
        return meta

    meta = metadata()
    if source is not None:
        # the file must rebuild this very model: check it now rather than at load time; a zoo
        # model whose structure was changed is saved as one the caller builds
        try:
            same = _same_structure(model, _restore(arch, blobs, "save_packed"))
        except ValueError:   # e.g. the constructor's graph does not fuse like the model's
            same = False
        if not same:
            arch["model"] = arch["kwargs"] = None
            meta = metadata()
    atomic_write_bytes(path, encode_safetensors(blobs, meta))


def _same_structure(model: nn.Module, rebuilt: nn.Module) -> bool:
    """Whether ``rebuilt`` has ``model``'s modules, graph and state, bit for bit."""
    from .graph import IntegerGraph
    if isinstance(model, IntegerGraph) != isinstance(rebuilt, IntegerGraph):
        return False
    if isinstance(model, IntegerGraph) and (model.code != rebuilt.code
                                            or model.fusions != rebuilt.fusions):
        return False
    a = dict(model.named_modules())
    b = dict(rebuilt.named_modules())
    if list(a) != list(b):
        return False
    for name in a:
        ma, mb = a[name], b[name]
        if not name and isinstance(ma, IntegerGraph):
            continue   # each GraphModule has its own class
        # (an LSQQuantizer's repr shows its init method, which inference never uses; its state
        # and its enabled flag are checked below and by the layer record)
        if type(ma) is not type(mb) or (ma.extra_repr() != mb.extra_repr()
                                        and not isinstance(ma, LSQQuantizer)):
            return False
    sa, sb = model.state_dict(), rebuilt.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k].cpu(), sb[k]) for k in sa)


def _restore(arch: dict, blobs: Dict[str, Tensor], where: str,
             model: Optional[nn.Module] = None) -> nn.Module:
    """Build the model of ``arch`` (on the caller's ``model`` structure if given) and load
    ``blobs`` into it, validating every size and value range. Raises ValueError naming the
    problem."""
    # a zoo description against the file's size before anything is built
    if model is None:
        _check_file_size(arch, blobs, where)
    built = _structure(arch, model, where)
    manifest = arch["state"]
    if not isinstance(manifest, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
            and isinstance(e[1], str) and isinstance(e[2], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e[2])
            for e in manifest):
        raise ValueError(f"{where}: architecture state expected [[key, blob, shape], ...]")
    need = {key: (blob, tuple(shape)) for key, blob, shape in _manifest(built)}
    have = {key: (blob, tuple(shape)) for key, blob, shape in manifest}
    if len(have) != len(manifest):
        raise ValueError(f"{where}: architecture state lists a key twice")
    missing = [k for k in need if k not in have]
    extra = [k for k in have if k not in need]
    if missing or extra:
        raise ValueError(f"{where}: the file's tensors do not fit the model: missing from the "
                         f"file {missing[:5]}{' ...' if len(missing) > 5 else ''}, not in the "
                         f"model {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, (blob, shape) in have.items():
        if need[key] != (blob, shape):
            raise ValueError(f"{where}: entry {key!r} is {blob} {list(shape)} in the file, the "
                             f"model needs {need[key][0]} {list(need[key][1])}")
    expected: Dict[str, int] = {}
    for key, (blob, shape) in have.items():
        expected[blob] = expected.get(blob, 0) + math.prod(shape)
    if set(blobs) != set(expected):
        raise ValueError(f"{where}: the file holds tensors {sorted(blobs)}, the architecture "
                         f"needs {sorted(expected)}")
    for blob, n in expected.items():
        t, dtype = blobs[blob], _blob_dtype(blob)
        if t.dtype != dtype or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{where}: tensor {blob!r} is {t.dtype} {list(t.shape)}, the "
                             f"architecture needs {dtype} [{n}]")
    ints = _int_layers(built)
    target = built.state_dict()
    state: Dict[str, Tensor] = {}
    offsets = dict.fromkeys(expected, 0)
    for key, blob, shape in manifest:
        numel = math.prod(shape)
        flat = blobs[blob][offsets[blob]:offsets[blob] + numel]
        offsets[blob] += numel
        if blob == "codes":
            lname = key[:-len(".w_codes")]
            m = ints[lname]
            if isinstance(m, QConv2dInt):
                kh, kw = m.kernel_size
                wshape = (m.out_channels, m.in_channels // m.groups, kh, kw)
            else:
                wshape = (m.out_features, m.in_features)
            codes = ops.unpack(flat.contiguous(), m.w_bits, math.prod(wshape), True)
            lo, hi = bit_range(m.code_bits, True)
            if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
                raise ValueError(f"{where}: layer {lname!r}: weight codes outside the "
                                 f"{m.code_bits}-bit range [{lo}, {hi}]")
            state[lname + ".w_packed"] = m._pack_weight(codes.reshape(wshape)).to(
                m.w_packed.device)
        else:
            state[key] = flat.reshape(target[key].shape).clone().to(target[key].device)
    _check_values(built, state, where)
    for lname, m in ints.items():
        scales = ["w_scale", "x_scale"] + (["out_scale"] if m.out_quant else [])
        for sname in scales:
            s = state[f"{lname}.{sname}"]
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError(f"{where}: layer {lname!r}: {sname} is not positive and finite")
        zps = [("x_zero_point", _code_domain(m.act_signed))]
        if m.out_quant:
            zps.append(("out_zero_point", _code_domain(m.out_quant_min < 0)))
        for zname, (lo, hi) in zps:
            zp = int(state[f"{lname}.{zname}"].item())
            if not lo <= zp <= hi:
                raise ValueError(f"{where}: layer {lname!r}: zero point {zname} = {zp} outside "
                                 f"the code domain [{lo}, {hi}]")
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: the tensors do not fit the architecture: {e}") from None
    return built.eval()


def _read_metadata(data: bytes, path: str) -> Dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: not an oqfl_ext packed model: the safetensors file has no "
                         "string metadata")
    return meta


def load_packed(path, map_location=None, *, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a model saved by :func:`save_packed` (format in its docstring), without pickle.

    Builds the structure: a zoo model from the file's description (``oqfl_ext.models.create``),
    or, for any other model, from ``model``: the structure the file was saved from before
    conversion (e.g. ``quantize_model(MyNet())``, calibrated or not, or the float ``MyNet()``;
    it is copied, not modified). The recorded integer and fake-quant layers replace its
    Conv2d/Linear layers (a quantized layer of ``model`` must have the recorded bits), and a
    fused graph is traced and fused again, which must give the recorded fusion. Then every
    tensor of the file is checked against that structure (format name and version, digest;
    before building a zoo model, its constructor arguments against
    ``oqfl_ext.models.ARGUMENT_RANGES`` and the file's size against the weights and BatchNorm
    layers they imply; every state entry's presence, blob and shape, the blobs' dtypes and
    sizes, the packed code bytes and their range, finite floating-point entries, non-negative
    BatchNorm running variances, positive scales, zero points inside the code domain),
    the weight codes are re-blocked for the kernels, and the model is returned in eval mode,
    on ``map_location`` (default CPU).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid, complete packed model (corrupt, truncated, another
            format or version, tensors that do not match the architecture), or ``model`` does
            not match it (missing, extra or mis-shaped tensors, other layer bits, another
            fused graph), or the file needs ``model`` and none was given; the message names
            the path and the problem.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    from safetensors.torch import load
    try:
        blobs = load(data)
    except Exception as e:  # safetensors raises SafetensorError and friends
        raise ValueError(f"{path}: not a valid safetensors file (corrupt or truncated): "
                         f"{type(e).__name__}: {e}") from None
    try:
        meta = _read_metadata(data, path)
    except (UnicodeDecodeError, ValueError, struct.error) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: unreadable safetensors header: {e}") from None
    fmt, version = meta.get("format"), meta.get("version")
    if fmt != PACKED_FORMAT:
        raise ValueError(f"{path}: format {fmt!r}, expected {PACKED_FORMAT!r} (a file "
                         "written by oqfl_ext.save_packed)")
    if version != str(PACKED_VERSION):
        old = (" (version 1 predates the fused integer graph; save the model again with this "
               "oqfl_ext)" if version == "1" else "")
        raise ValueError(f"{path}: {PACKED_FORMAT} version {version!r}, this oqfl_ext reads "
                         f"version {PACKED_VERSION}{old}")
    unknown = set(meta) - {"format", "version", "architecture", "digest"}
    if unknown or "architecture" not in meta or "digest" not in meta:
        raise ValueError(f"{path}: metadata keys {sorted(meta)}, expected ['architecture', "
                         "'digest', 'format', 'version']")
    if _digest(meta, blobs) != meta["digest"]:
        raise ValueError(f"{path}: digest mismatch: the file was corrupted or altered")
    try:
        arch = json.loads(meta["architecture"])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: metadata 'architecture' is not valid JSON ({e})") from None
    try:
        loaded = _restore(arch, blobs, path, model)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    if map_location is not None:
        loaded = loaded.to(map_location)
    return loaded
