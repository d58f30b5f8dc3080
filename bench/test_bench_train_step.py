"""Benchmark: one training step of ResNet-20 (batch 128, 3x32x32) in four variants.

Every group is one device and holds:

``float``
    ``oqfl_ext.models.ResNet20`` as is.
``oqfl``
    Every Conv2d/Linear replaced by ``QuantConv2d`` / ``QuantLinear`` at W4A4
    (``quantize_model(..., first_last_bits=None)``): signed 4-bit weights with a learned step
    size per output channel, 4-bit inputs with a learned step size per tensor (unsigned after
    a ReLU, signed with a learned offset for the image), the fused ``oqfl::fake_quant`` op.
``torch_ao``
    The same layers with PyTorch's ``torch.ao.quantization._LearnableFakeQuantize`` on the
    weight (per-channel symmetric, -8..7) and the input (per-tensor affine, 0..15, learned zero
    point), both with ``use_grad_scaling=True``, initialized by their min/max observers on one
    batch, then in parameter-learning mode.
``eager_lsq``
    The ``oqfl`` model with every quantizer computing the same LSQ math in plain PyTorch eager
    ops (``lsq_fake_quant`` of ``test_bench_fake_quant.py``) instead of the fused op.

A step is ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward, ``SGD(lr=0.01,
momentum=0.9)`` step, on a fixed random batch; CUDA steps end with a synchronize. The models
start from the same seed; quantizers are initialized by one untimed batch. Default threads,
default allocator, contiguous (NCHW) tensors.
"""

from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from test_bench_fake_quant import _oqfl_ops, lsq_fake_quant

BATCH = 128
INPUT = (3, 32, 32)
LR = 0.01
VARIANTS = ("float", "oqfl", "torch_ao", "eager_lsq")
DEVICES = ("cpu", "cuda")
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def group_name(device: str) -> str:
    return f"resnet20-b{BATCH}-train-step-{device}"


# ----------------------------------------------------------------------------------------------
# Baseline quantizers
# ----------------------------------------------------------------------------------------------


def _eager_quantizer_class():
    from oqfl_ext.nn import LSQQuantizer

    class EagerLSQQuantizer(LSQQuantizer):
        """LSQQuantizer (same parameters, initialization and step-size guard) computing the
        fake quantization with plain PyTorch ops."""

        def forward(self, x):
            if not self.enabled:
                return x
            if not self.is_initialized():
                self.initialize(x)
            scale, zero_point = self.quant_params()
            kw = self.op_kwargs(x)
            return lsq_fake_quant(x, scale, zero_point, kw["quant_min"], kw["quant_max"],
                                  kw["axis"], kw["grad_factor"])

    return EagerLSQQuantizer


def use_eager_lsq(model: nn.Module) -> nn.Module:
    """Switch every LSQQuantizer of ``model`` to the plain-eager implementation, in place."""
    from oqfl_ext.nn import LSQQuantizer

    eager = _eager_quantizer_class()
    for m in model.modules():
        if type(m) is LSQQuantizer:
            m.__class__ = eager
    return model


def _ao_fake_quants(out_channels: int):
    from torch.ao.quantization import (MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver)
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    weight = _LearnableFakeQuantize(
        MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
        channel_len=out_channels, use_grad_scaling=True, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0)
    act = _LearnableFakeQuantize(
        MovingAverageMinMaxObserver, quant_min=0, quant_max=15, use_grad_scaling=True,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    return weight, act


class AOQuantConv2d(nn.Conv2d):
    """nn.Conv2d with torch.ao learnable fake quantizers on its input and weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> "AOQuantConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, device=conv.weight.device)
        m.load_state_dict(conv.state_dict())
        m.weight_fake_quant, m.act_fake_quant = _ao_fake_quants(conv.out_channels)
        return m.to(conv.weight.device)

    def forward(self, x):
        return self._conv_forward(self.act_fake_quant(x), self.weight_fake_quant(self.weight),
                                  self.bias)


class AOQuantLinear(nn.Linear):
    """nn.Linear with torch.ao learnable fake quantizers on its input and weight."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "AOQuantLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device)
        m.load_state_dict(linear.state_dict())
        m.weight_fake_quant, m.act_fake_quant = _ao_fake_quants(linear.out_features)
        return m.to(linear.weight.device)

    def forward(self, x):
        return F.linear(self.act_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)


def use_torch_ao(model: nn.Module) -> nn.Module:
    """Replace every Conv2d/Linear of ``model`` by the torch.ao-quantized twins, in place."""
    swap = {nn.Conv2d: AOQuantConv2d, nn.Linear: AOQuantLinear}
    for name, m in list(model.named_modules()):
        if type(m) in swap:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, swap[type(m)].from_float(m))
    return model


# ----------------------------------------------------------------------------------------------
# Models and steps
# ----------------------------------------------------------------------------------------------


def make_model(variant: str, device: str, x: torch.Tensor) -> nn.Module:
    """ResNet-20 of the variant, its quantizers initialized from ``x``."""
    from oqfl_ext import models, quantize_model
    from oqfl_ext.nn import calibrate

    torch.manual_seed(0)
    model = models.ResNet20(in_channels=INPUT[0], image_size=INPUT[1]).to(device)
    if variant in ("oqfl", "eager_lsq"):
        model = quantize_model(model, weight_bits=4, act_bits=4, first_last_bits=None,
                               inplace=True)
        if variant == "eager_lsq":
            use_eager_lsq(model)
        calibrate(model, x)
    elif variant == "torch_ao":
        use_torch_ao(model)
        calibrate(model, x)  # observers set scale and zero point
        for m in model.modules():
            if hasattr(m, "enable_param_learning"):
                m.enable_param_learning()
    elif variant != "float":
        raise ValueError(variant)
    return model.train()


@functools.lru_cache(maxsize=None)
def _batch(device: str):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((BATCH,) + INPUT, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return x.to(device), y.to(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sync=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sync is not None:
            sync()
        return loss

    return step


def _skip_reason(variant: str, device: str) -> Optional[str]:
    oq, reason = _oqfl_ops()
    if oq is None:  # every variant needs it: the model comes from oqfl_ext.models
        return reason
    if device == "cuda" and variant in ("oqfl", "eager_lsq") and not \
            torch._C._dispatch_has_kernel_for_dispatch_key("oqfl::fake_quant", "CUDA"):
        return "oqfl_ext was built without CUDA kernels"
    return None


def _params():
    return [pytest.param(device, variant, marks=[_NO_CUDA] if device == "cuda" else [],
                         id=f"{group_name(device)}-{variant}")
            for device in DEVICES for variant in VARIANTS]


@pytest.mark.parametrize("device,variant", _params())
def test_train_step(benchmark, device, variant):
    benchmark.group = group_name(device)
    reason = _skip_reason(variant, device)
    if reason:
        pytest.skip(reason)
    x, y = _batch(device)
    model = make_model(variant, device, x)
    step = make_step(model, x, y, torch.cuda.synchronize if device == "cuda" else None)
    benchmark.extra_info.update({
        "variant": variant, "device": device, "batch": BATCH, "input": list(INPUT),
        "torch_num_threads": torch.get_num_threads(),
    })
    if not benchmark.disabled:
        step()  # first-touch allocations and the backward graph's first build stay untimed
    loss = benchmark(step)
    assert torch.isfinite(loss).item()


# ----------------------------------------------------------------------------------------------
# The baseline computes what ours computes, so the ratio compares the same math.
# ----------------------------------------------------------------------------------------------


def test_eager_lsq_matches_oqfl():
    oq, reason = _oqfl_ops()
    if oq is None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, *INPUT, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    outs = []
    for variant in ("oqfl", "eager_lsq"):
        model = make_model(variant, "cpu", x)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        # (the offsets of unsigned inputs are unused: no gradient)
        steps = {n: p.grad.clone() for n, p in model.named_parameters()
                 if n.endswith(("step_size", "offset")) and p.grad is not None}
        outs.append((loss.detach(), steps))
    (loss_a, grads_a), (loss_b, grads_b) = outs
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 40
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
