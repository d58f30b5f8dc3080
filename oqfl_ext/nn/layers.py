"""QuantConv2d and QuantLinear: nn.Conv2d / nn.Linear with learnable LSQ fake quantizers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .quantizer import QUANT_DEFAULTS, LSQQuantizer, bit_range

__all__ = ["QuantConv2d", "QuantLinear"]


class _QuantMixin:
    """Quantizer construction, description and conversion shared by the quantized layers."""

    weight_quantizer: Optional[LSQQuantizer]
    act_quantizer: Optional[LSQQuantizer]

    def _init_quantizers(self, weight_bits: Optional[int], act_bits: Optional[int],
                         act_signed: Optional[bool], device) -> None:
        if weight_bits is not None:
            bit_range(weight_bits, True, "weight_bits")
        if act_bits is not None:
            bit_range(act_bits, True, "act_bits")
        if act_signed is not None and not isinstance(act_signed, bool):
            raise ValueError(f"act_signed expected True, False or None, got {act_signed!r}")
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.act_signed = act_signed
        # Weights: signed codes, one step size per output channel (axis 0 of the weight).
        self.weight_quantizer = None if weight_bits is None else LSQQuantizer(
            weight_bits, True, per_channel_axis=0, num_channels=self.weight.shape[0],
            device=device)
        # Inputs: one step size; unsigned without offset when known non-negative
        # (act_signed=False), signed with a learnable offset otherwise (LSQ+); axis 0 is the
        # batch, so the gradient scale may count one example's elements.
        self.act_quantizer = None if act_bits is None else LSQQuantizer(
            act_bits, act_signed, learn_offset=act_signed is not False,
            grad_count=QUANT_DEFAULTS["act_grad_count"], device=device)

    def quantized_weight(self) -> Tensor:
        """The weight as the layer uses it (fake-quantized when ``weight_bits`` is set)."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x: Tensor) -> Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def _quant_repr(self) -> str:
        signed = {None: "auto", True: "signed", False: "unsigned"}[self.act_signed]
        return f"weight_bits={self.weight_bits}, act_bits={self.act_bits}, act_signed={signed}"

    @classmethod
    def _check_float(cls, module, float_type) -> None:
        if not isinstance(module, float_type):
            raise TypeError(f"{cls.__name__}.from_float: module expected an "
                            f"nn.{float_type.__name__}, got {type(module).__name__}")

    def _copy_from(self, module: nn.Module) -> None:
        with torch.no_grad():
            self.weight.copy_(module.weight)
            if module.bias is not None:
                self.bias.copy_(module.bias)
        self.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            self.bias.requires_grad_(module.bias.requires_grad)
        self.train(module.training)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight go through learnable LSQ fake quantizers.

    Same constructor arguments and state_dict keys as ``nn.Conv2d``, plus the quantizers'
    (``weight_quantizer.*``, ``act_quantizer.*``), and:

    Args:
        weight_bits: bits of the weight codes (2..8): signed, one learnable step size per
            output channel. ``None`` keeps the weight in float.
        act_bits: bits of the input codes (2..8): one learnable step size per tensor.
            ``None`` keeps the input in float.
        act_signed: ``False``: the input is known to be non-negative (e.g. after a ReLU):
            unsigned codes, no offset. ``True``: signed codes with a learnable offset.
            ``None`` (default): decided by the first batch (unsigned without offset when it
            has no negative value, signed with offset otherwise); see :class:`LSQQuantizer`.

    ``forward(x)`` is ``conv2d(act_quantizer(x), weight_quantizer(weight), bias)``; the bias
    stays in float. Any memory format, train or eval mode, CPU or CUDA, ``torch.autocast``
    (the quantizers run in the dtype they receive; the convolution autocasts as usual) and
    ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, weight_bits: Optional[int] = 4,
                 act_bits: Optional[int] = 4, act_signed: Optional[bool] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_quantizers(weight_bits, act_bits, act_signed, device)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self._quantize_input(input), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_bits: Optional[int] = 4,
                   act_bits: Optional[int] = 4, act_signed: Optional[bool] = None
                   ) -> "QuantConv2d":
        """A ``QuantConv2d`` with ``module``'s configuration, a copy of its weight and bias, on
        its device and dtype, in its train/eval mode (quantizers initialized by the first
        batch)."""
        cls._check_float(module, nn.Conv2d)
        q = cls(module.in_channels, module.out_channels, module.kernel_size,
                stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups, bias=module.bias is not None,
                padding_mode=module.padding_mode, device=module.weight.device,
                dtype=module.weight.dtype, weight_bits=weight_bits, act_bits=act_bits,
                act_signed=act_signed)
        q._copy_from(module)
        return q


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose input and weight go through learnable LSQ fake quantizers.

    Same constructor arguments and state_dict keys as ``nn.Linear`` plus the quantizers', and
    ``weight_bits``, ``act_bits``, ``act_signed`` as in :class:`QuantConv2d` (weight step size
    per output feature, input step size per tensor).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, weight_bits: Optional[int] = 4, act_bits: Optional[int] = 4,
                 act_signed: Optional[bool] = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(weight_bits, act_bits, act_signed, device)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self._quantize_input(input), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()

    @classmethod
    def from_float(cls, module: nn.Linear, weight_bits: Optional[int] = 4,
                   act_bits: Optional[int] = 4, act_signed: Optional[bool] = None
                   ) -> "QuantLinear":
        """A ``QuantLinear`` with ``module``'s shape, a copy of its weight and bias, on its
        device and dtype, in its train/eval mode."""
        cls._check_float(module, nn.Linear)
        q = cls(module.in_features, module.out_features, bias=module.bias is not None,
                device=module.weight.device, dtype=module.weight.dtype,
                weight_bits=weight_bits, act_bits=act_bits, act_signed=act_signed)
        q._copy_from(module)
        return q
