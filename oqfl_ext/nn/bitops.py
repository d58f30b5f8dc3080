"""cost(): parameter bytes at each layer's bit width and BitOPs, for results tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from .layers import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["cost", "CostReport", "LayerCost"]


@dataclass
class LayerCost:
    """One Conv2d/Linear (float or quantized) of a model."""
    name: str
    type: str
    weight_bits: int       # the code width, or the float weight's bits (32 for float32)
    act_bits: int          # the input code width, or the float input's bits
    params: int            # weight and bias elements (quantizer step sizes/offsets excluded)
    param_bytes: float     # weight at weight_bits + bias and quantizer parameters in float
    macs: int              # multiply-accumulates of one forward pass of the given input
    bitops: int            # macs * weight_bits * act_bits


@dataclass
class CostReport:
    """What :func:`cost` measured; ``table()`` renders it as markdown."""
    input_shape: Tuple[int, ...]
    layers: List[LayerCost] = field(default_factory=list)
    other_param_bytes: int = 0      # parameters outside Conv2d/Linear (e.g. BatchNorm), in float
    float_param_bytes: int = 0      # every parameter of the model at its float size

    @property
    def param_bytes(self) -> float:
        return sum(layer.param_bytes for layer in self.layers) + self.other_param_bytes

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bitops(self) -> int:
        return sum(layer.bitops for layer in self.layers)

    @property
    def compression(self) -> float:
        """Float parameter bytes over quantized parameter bytes."""
        return self.float_param_bytes / self.param_bytes if self.param_bytes else 1.0

    def table(self) -> str:
        lines = [f"Input {tuple(self.input_shape)}; BitOPs = MACs x weight bits x input bits "
                 "(float sides count their dtype's bits).", "",
                 "| layer | type | W bits | A bits | params | param KiB | MMACs | GBitOPs |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in self.layers:
            lines.append(f"| {c.name} | {c.type} | {c.weight_bits} | {c.act_bits} | {c.params} "
                         f"| {c.param_bytes / 1024:.2f} | {c.macs / 1e6:.3f} "
                         f"| {c.bitops / 1e9:.4f} |")
        lines.append(f"| other parameters | | | | | {self.other_param_bytes / 1024:.2f} | | |")
        lines.append(f"| **total** | | | | | {self.param_bytes / 1024:.2f} "
                     f"| {self.macs / 1e6:.3f} | {self.bitops / 1e9:.4f} |")
        lines += ["", f"Float parameters: {self.float_param_bytes / 1024:.2f} KiB "
                      f"({self.compression:.2f}x the quantized size)."]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features


def cost(model: nn.Module, input_shape: Sequence[int]) -> CostReport:
    """Parameter bytes and BitOPs of ``model`` for one forward pass of an input of
    ``input_shape`` (``(C, H, W)`` means a batch of one).

    Every ``nn.Conv2d`` / ``nn.Linear`` (quantized or not) is a row: its weight counts at the
    layer's weight bits (packed, ``numel * bits / 8`` bytes), its bias and quantizer step sizes
    and offsets at float32, and its BitOPs are ``MACs * weight bits * input bits``, where a
    float side counts the bits of its dtype (32 for float32). Other parameters (batch norm)
    count at their dtype. The shapes come from a forward pass on the ``meta`` device (no
    computation, no quantizer initialization, the model is left as it was), so ``model`` must
    run on meta tensors: only shape-dependent control flow.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"input_shape expected (C, H, W) or (N, C, ...) of positive sizes, "
                         f"got {tuple(input_shape)}")
    report = CostReport(input_shape=shape)
    calls: dict = {}

    def hook(module, args, output):
        calls.setdefault(module, []).append((args[0].dtype, _macs(module, output)))

    layers = [(n or "(model)", m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for _, m in layers]
    quantizers = [(q, q.enabled) for q in model.modules() if isinstance(q, LSQQuantizer)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for q, _ in quantizers:
            q.enabled = False  # nothing to initialize from meta data
        model.eval()
        meta = {name: t.to("meta") for name, t in
                list(model.named_parameters()) + list(model.named_buffers())}
        with torch.no_grad():
            functional_call(model, meta, (torch.empty(shape, device="meta"),))
    finally:
        for h in handles:
            h.remove()
        for q, enabled in quantizers:
            q.enabled = enabled
        for m, training in modes:
            m.training = training

    quantizer_params = {id(p) for q, _ in quantizers for p in q.parameters()}
    in_layers = set()
    for name, m in layers:
        quant = isinstance(m, (QuantConv2d, QuantLinear))
        float_bits = m.weight.element_size() * 8
        wb = m.weight_bits if quant and m.weight_bits is not None else float_bits
        records = calls.get(m, [])
        in_dtype = records[0][0] if records else m.weight.dtype
        ab = m.act_bits if quant and m.act_bits is not None else \
            torch.finfo(in_dtype).bits
        macs = sum(r[1] for r in records)
        nbytes = m.weight.numel() * wb / 8
        own = [p for p in m.parameters() if p is not m.weight]  # bias and quantizer params
        nbytes += sum(p.numel() * p.element_size() for p in own)
        params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        report.layers.append(LayerCost(name, type(m).__name__, wb, ab, params, nbytes, macs,
                                       macs * wb * ab))
        in_layers.update(id(p) for p in m.parameters())
    for p in model.parameters():
        if id(p) in quantizer_params:
            continue
        report.float_param_bytes += p.numel() * p.element_size()
        if id(p) not in in_layers:
            report.other_param_bytes += p.numel() * p.element_size()
    return report
