"""oqfl_ext.convert's fused integer graph (oqfl_ext/nn/graph.py).

* exact: the converted graph equals an integer reference of the same graph bit for bit. The
  reference runs the graph with torch.fx's Interpreter, but every integer layer is computed from
  its codes with PyTorch ops in float64 (exact for these sizes): input codes, F.conv2d /
  matmul of (u - zero point) and the weight codes, then the op's float32 epilogue written out
  (rescale, bias, residual, relu, clamp, requantization with torch.round); code max pooling is
  F.max_pool2d on the codes in float64;
* the fake-quant model: with integer zero points both compute the same codes except where float
  rounding (BatchNorm folded into the scales, a different order of float operations) moves a
  value sitting on a rounding boundary of the next quantizer; the bound is stated where tested;
* structure: every BatchNorm after a conv folded, no fake-quant or float conv/linear left, for
  the zoo and torchvision's resnet18 / mobilenet_v2;
* negative BatchNorm factors, ReLU/ReLU6 spellings, residual adds, codes through max pooling and
  flatten, the fallback for an untraceable model, and a trained Fashion-MNIST model.
"""

from __future__ import annotations

import itertools
import operator

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import (ConversionWarning, LSQQuantizer, QConv2dInt, QLinearInt, QuantConv2d,
                         QuantLinear, calibrate, convert, load_packed, save_packed)
from oqfl_ext.nn.graph import IntegerGraph, max_pool2d_codes

from conftest import requires_cuda
from helpers import settle_batchnorm

torchvision = pytest.importorskip("torchvision")


# ------------------------------------------------------------------------------------------
# helpers

def _prepare(model: nn.Module, x: torch.Tensor, **quant) -> nn.Module:
    """Settle BatchNorm, quantize, calibrate, integer offsets (the fake-quant model then uses
    the converted zero points exactly), eval."""
    settle_batchnorm(model, x)
    model = oqfl_ext.quantize_model(model, **quant)
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.init = "lsq"   # cheaper than the MSE search, as good for these tests
    calibrate(model.eval(), x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LSQQuantizer) and m.offset is not None:
                m.offset.round_()
    return model.eval()


def _layer_reference(m, x, residual=None):
    """Integer layer ``m`` computed from its codes (module docstring)."""
    zp = int(m.x_zero_point.item())
    if m.input_codes:
        assert x.dtype == (torch.int8 if m.act_signed else torch.uint8)
        u = x.double()
    else:
        u = torch.clamp(torch.round(x.float() / m.x_scale + zp), m.x_quant_min,
                        m.x_quant_max).double()
    d = u - zp
    w = m.weight_codes().double()
    if isinstance(m, QConv2dInt):
        if m._prepad:
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            d = F.pad(d, m._reversed_padding_repeated_twice, mode=mode)
        acc = F.conv2d(d, w, None, m.stride, m._op_padding, m.dilation, m.groups)
        shape = (1, -1, 1, 1)
    else:
        acc = d @ w.t()
        shape = (-1,)
    assert torch.equal(acc, acc.round()) and acc.abs().max() < 2 ** 31   # exact integers
    v = acc.float() * (m.x_scale * m.w_scale).reshape(shape)
    if m.bias is not None:
        v = v + m.bias.reshape(shape)
    if residual is not None:
        v = v + residual.float()
    if m.relu:
        v = v.clamp_min(0.0)
    if m.clamp_max is not None:
        v = v.clamp_max(m.clamp_max)
    if m.out_quant is None:
        return v
    codes = torch.clamp(torch.round(v / m.out_scale + m.out_zero_point.float()),
                        m.out_quant_min, m.out_quant_max)
    return codes.to(torch.uint8 if m.out_quant_min >= 0 else torch.int8)


class _Reference(fx.Interpreter):
    """The converted graph with every integer layer and code pooling replaced by the
    references above."""

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, (QConv2dInt, QLinearInt)):
            return _layer_reference(m, *args, **kwargs)
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target is max_pool2d_codes:
            x = args[0]
            return F.max_pool2d(x.double(), **kwargs).to(x.dtype)
        return super().call_function(target, args, kwargs)


def _reference(gm: IntegerGraph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _Reference(gm).run(x)


def _assert_fully_integer(gm: nn.Module) -> None:
    """No BatchNorm, fake-quant layer or float conv/linear module, and no float conv/linear
    function in the graph."""
    assert isinstance(gm, IntegerGraph)
    left = [f"{n}: {type(m).__name__}" for n, m in gm.named_modules()
            if isinstance(m, (nn.BatchNorm2d, nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear))]
    assert not left, left
    calls = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not calls & {F.conv2d, F.linear, torch.conv2d, F.batch_norm}, calls
    assert any(isinstance(m, (QConv2dInt, QLinearInt)) for m in gm.modules())


def _input_codes(m, x):
    """(input codes, the fake-quant value in code units before rounding or None) of the
    quantized or integer layer ``m`` for its input ``x``."""
    if isinstance(m, (QConv2dInt, QLinearInt)):
        if m.input_codes:
            return x.long(), None
        s, z, lo, hi = m.x_scale, float(m.x_zero_point.item()), m.x_quant_min, m.x_quant_max
    else:
        q = m.act_quantizer
        s, z = q.quant_params()
        s, z, lo, hi = s.detach(), 0.0 if z is None else float(z), q.quant_min, q.quant_max
    r = x.float() / s + z
    return torch.clamp(torch.round(r), lo, hi).long(), r


def _capture(model, x):
    """Logits and, in execution order, every quantized layer's input codes."""
    out = {}
    kinds = (QuantConv2d, QuantLinear, QConv2dInt, QLinearInt)
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: out.__setitem__(name, _input_codes(mod, args[0])))
        for name, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, out


# How far (in code units) from a rounding tie a fake-quant value may be when the integer graph
# rounds it the other way: its float value differs by float32 rounding only (folded BatchNorm,
# another order of the same float operations), a few ulps of the partial sums.
TIE_DISTANCE = 1e-3


def _compare_with_fake_quant(model, gm, x):
    """The documented bound, checked: with integer zero points both models compute the same
    codes, except where a layer's fake-quant value lies within TIE_DISTANCE of a rounding tie
    (the first differing layer of a sample; later layers inherit the difference); a sample
    whose codes all agree gets the same logits up to float rounding (1e-5 of their scale).
    Returns (share of samples with some differing code, share with the same class)."""
    y_fq, fq = _capture(model, x)
    y_int, it = _capture(gm, x)
    assert list(fq) == [n for n in fq if n in it]
    diverged = torch.zeros(len(x), dtype=torch.bool)
    for name in fq:
        (cf, r), (ci, _) = fq[name], it[name]
        diff = (cf != ci).flatten(1)
        new = diff.any(1) & ~diverged
        if new.any():
            dist = ((r.flatten(1) - r.flatten(1).floor()) - 0.5).abs()
            worst = dist[new][diff[new]].max().item()
            assert worst <= TIE_DISTANCE, (name, worst)
        diverged |= diff.any(1)
    scale = y_fq.abs().max().item()
    same_codes = ~diverged
    torch.testing.assert_close(y_int[same_codes], y_fq[same_codes], rtol=0,
                               atol=1e-5 * scale)
    agree = (y_int.argmax(1) == y_fq.argmax(1)).float().mean().item()
    return diverged.float().mean().item(), agree


# ------------------------------------------------------------------------------------------
# code max pooling

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_max_pool2d_codes_equals_float_max_pooling(dtype):
    g = torch.Generator().manual_seed(0)
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max + 1, (2, 3, 19, 23), generator=g).to(dtype)
    x_before = x.clone()
    cases = 0
    for k, s, p, d, ceil in itertools.product((1, 2, 3), (None, 1, 2, 3), (0, 1), (1, 2),
                                              (False, True)):
        if p > k // 2:
            continue
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            want = F.max_pool2d(xx.double(), k, s, p, d, ceil)
            got = max_pool2d_codes(xx, k, s, p, d, ceil)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got.double(), want), (k, s, p, d, ceil)
            # without padding the views read x itself: the result must still be its own tensor
            assert got.untyped_storage().data_ptr() != xx.untyped_storage().data_ptr()
            cases += 1
    assert cases > 50
    assert torch.equal(x, x_before)   # the input is never written
    # planes beyond 255 elements (where PyTorch's own uint8 pooling fails) and the smallest
    # code everywhere (padding holds it too, and must not change the result)
    big = torch.full((1, 2, 40, 40), info.min, dtype=dtype)
    big[0, 1, 5, 7] = info.max
    got = max_pool2d_codes(big, 3, 2, 1)
    assert torch.equal(got.double(), F.max_pool2d(big.double(), 3, 2, 1))


# ------------------------------------------------------------------------------------------
# whole networks: structure, exactness, the fake-quant model

ZOO = [
    ("small_cnn", dict(in_channels=1, image_size=16, width=8), (16, 1, 16, 16)),
    ("vgg", dict(width=8, hidden=32, image_size=16), (16, 3, 16, 16)),
    ("resnet20", dict(image_size=16), (16, 3, 16, 16)),
    ("mobilenet_v2", dict(last_channels=64, image_size=16), (16, 3, 16, 16)),
]


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_become_integer_graphs(name, kwargs, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = _prepare(models.create(name, **kwargs), x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    gm = convert(model)
    _assert_fully_integer(gm)
    assert gm.source["model"] == name
    assert gm.source["kwargs"].items() >= dict(kwargs, in_channels=shape[1]).items()
    assert sum(f.bn is not None for f in gm.fusions.values()) == n_bn
    # every layer but the classifier has its activation (or residual) fused
    assert all(f.relu or f.residual or f.bn for f in gm.fusions.values() if f.out_codes)
    assert gm.plan_status().startswith("C++ plan")   # gm(x) runs the C++ plan
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, _reference(gm, x))
    diverged, same = _compare_with_fake_quant(model, gm, x)
    assert diverged <= 0.25 and same >= 0.9, (diverged, same)
    # the input check of the zoo survives the tracing
    with pytest.raises(ValueError, match="input expected shape"):
        gm(torch.randn(2, shape[1], shape[2] + 1, shape[3]))


@pytest.mark.parametrize("ctor", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_become_integer_graphs(ctor):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _prepare(getattr(torchvision.models, ctor)(num_classes=10), x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    gm = convert(model)
    _assert_fully_integer(gm)
    assert sum(f.bn is not None for f in gm.fusions.values()) == n_bn
    residuals = sum(f.residual for f in gm.fusions.values())
    assert residuals == (8 if ctor == "resnet18" else 10)
    assert not any(n.op == "call_function" and n.target in (operator.add, operator.iadd)
                   for n in gm.graph.nodes)
    # codes flow between most layers (not out of a block whose output feeds two layers)
    assert sum(f.out_codes is not None for f in gm.fusions.values()) >= len(gm.fusions) // 3
    assert gm.plan_status().startswith("C++ plan")   # gm(x) runs the C++ plan
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, _reference(gm, x))
    diverged, same = _compare_with_fake_quant(model, gm, x)
    assert diverged <= 0.25 and same >= 0.75, (diverged, same)


# ------------------------------------------------------------------------------------------
# the patterns one by one

class _Block(nn.Module):
    """conv - BN - activation, then conv - BN + residual (the block's input) - ReLU, then
    max pooling, flatten and a linear layer: every pattern of the rewrite."""

    def __init__(self, act: str, c: int = 6, pool_padding: int = 1):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(3, stride=2, padding=pool_padding)
        self.relu6 = nn.ReLU6()
        self.fc = nn.Linear(c * 5 * 5, 4)

    def activation(self, x):
        return {"nn.ReLU6": lambda: self.relu6(x), "F.relu6": lambda: F.relu6(x),
                "hardtanh": lambda: F.hardtanh(x, 0.0, 6.0), "torch.relu": lambda: torch.relu(x),
                "Tensor.relu": lambda: x.relu(), "F.relu": lambda: F.relu(x)}[self.act]()

    def forward(self, x):
        h = self.activation(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        h += x
        h = F.relu(h)
        return self.fc(torch.flatten(self.pool(h), 1))


ACTS = ["nn.ReLU6", "F.relu6", "hardtanh", "torch.relu", "Tensor.relu", "F.relu"]


@pytest.mark.parametrize("act", ACTS)
def test_block_patterns(act):
    torch.manual_seed(1)
    x = torch.randn(12, 6, 10, 10)
    model = _prepare(_Block(act), x, first_last_bits=None)
    gm = convert(model)
    _assert_fully_integer(gm)
    f1, f2, fc = (gm.fusions[n] for n in ("conv1", "conv2", "fc"))
    assert f1.bn == "bn1" and f1.relu and f1.clamp_max == (6.0 if "6" in act or act ==
                                                          "hardtanh" else None)
    assert f1.out_codes == "conv2" and f2.input_codes
    assert f2.bn == "bn2" and f2.residual and f2.relu and f2.clamp_max is None
    assert f2.out_codes == "fc" and fc.input_codes     # through max pooling and flatten
    assert fc.out_codes is None and not fc.relu        # the logits stay float
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert max_pool2d_codes in ops and operator.iadd not in ops
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), (
        nn.ReLU6, nn.MaxPool2d)) for n in gm.graph.nodes)
    assert gm.plan_status().startswith("C++ plan")   # gm(x) runs the C++ plan
    with torch.no_grad():
        got = gm(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, _reference(gm, x))
    diverged, same = _compare_with_fake_quant(model, gm, x)
    assert diverged <= 0.25 and same >= 0.75


def test_codes_between_layers_are_the_consumers_input_codes():
    """The producer writes exactly the codes the consumer's own quantizer would compute from
    the float value (uint8 for an unsigned consumer; signed consumers get int8)."""
    torch.manual_seed(2)
    x = torch.randn(8, 6, 10, 10)
    model = _prepare(_Block("F.relu"), x, first_last_bits=None,
                     overrides={"conv2": {"act_signed": True}})
    gm = convert(model)
    seen = {}
    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in ("conv2", "fc")]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    assert seen["conv2"].dtype == torch.int8 and seen["fc"].dtype == torch.uint8
    assert gm.get_submodule("conv1").out_quant == (-8, 7)
    # the float value of the unfused chain, quantized by the consumer's parameters
    plain = convert(model, fuse=False)
    v = {}
    h = plain.conv1.register_forward_hook(lambda m, a, out: v.__setitem__("c1", out))
    with torch.no_grad():
        plain(x)
    h.remove()
    c2 = gm.get_submodule("conv2")
    u = torch.clamp(torch.round(F.relu(model.bn1(v["c1"])) / c2.x_scale
                                + c2.x_zero_point.float()), -8, 7)
    # the same codes up to float rounding at rounding ties (see _compare_with_fake_quant)
    assert (u != seen["conv2"].float()).float().mean() <= 1e-3


def test_negative_batchnorm_factors_are_folded_exactly():
    """gamma < 0 negates the channel's weight codes (the op takes w_scale > 0); gamma = 0 makes
    the channel the constant beta; a negated -8 needs 5 bits (int8 container)."""
    torch.manual_seed(3)
    x = torch.randn(8, 4, 9, 9)
    float_model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8),
                                nn.Conv2d(8, 3, 1), nn.BatchNorm2d(3))
    model = _prepare(float_model, x, weight_bits=4, act_bits=8, first_last_bits=None)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -0.7, 0.0, 2.0, -1.5, 0.3, -0.01, 1.0]))
        model[3].weight.copy_(torch.tensor([-1.0, -2.0, 0.5]))
        # make sure a negated channel holds the most negative code -8
        w = model[0].weight
        s = model[0].weight_quantizer.quant_params()[0].detach()
        w[1, 0, 0, 0] = -9.0 * s[1]
    gm = convert(model)
    _assert_fully_integer(gm)
    first, second = gm.get_submodule("0"), gm.get_submodule("2")
    assert first.weight_bits == 4 and first.code_bits == 5 and first.w_bits == 8
    assert int(first.weight_codes()[1].max()) == 8
    assert bool((first.w_scale > 0).all()) and bool((second.w_scale > 0).all())
    plain = convert(model, fuse=False)[0]
    assert torch.equal(first.weight_codes()[[0, 3, 5, 7]], plain.weight_codes()[[0, 3, 5, 7]])
    assert torch.equal(first.weight_codes()[[1, 4, 6]], -plain.weight_codes()[[1, 4, 6]])
    assert not first.weight_codes()[2].any()
    assert gm.plan_status().startswith("C++ plan")   # gm(x) runs the C++ plan
    with torch.no_grad():
        got = gm(x)
    assert torch.equal(got, _reference(gm, x))
    # second layer: float output, compared with conv -> BN of the fake-quant model directly;
    # the codes agree (checked), so only float rounding differs: |diff| <= 1e-5 of the scale
    diverged, _ = _compare_with_fake_quant(model, gm, x)
    assert diverged <= 0.25


def test_negative_batchnorm_factors_round_trip(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(8, 4, 9, 9)
    float_model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = _prepare(float_model, x, weight_bits=3, act_bits=8, first_last_bits=None)
    with torch.no_grad():
        model[1].weight[1] = -0.7
        s = model[0].weight_quantizer.quant_params()[0].detach()
        model[0].weight[1, 0, 0, 0] = -9.0 * s[1]         # the code -4, negated: 4 bits
    gm = convert(model)
    assert gm.get_submodule("0").code_bits == 4 and gm.get_submodule("0").w_bits == 4
    p = tmp_path / "neg.safetensors"
    save_packed(gm, p)
    loaded = load_packed(p, model=nn.Sequential(nn.Conv2d(4, 8, 3, padding=1),
                                                nn.BatchNorm2d(8), nn.ReLU()))
    assert loaded.get_submodule("0").code_bits == 4
    _same_state(gm, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_an_8bit_code_that_cannot_be_negated_keeps_its_batchnorm():
    torch.manual_seed(4)
    x = torch.randn(4, 3, 6, 6)
    model = _prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), x,
                     weight_bits=8, act_bits=8, first_last_bits=None)
    with torch.no_grad():
        model[1].weight[2] = -1.0
        s = model[0].weight_quantizer.quant_params()[0].detach()
        model[0].weight[2, 0, 0, 0] = -200.0 * s[2]     # the code -128
    with pytest.warns(ConversionWarning, match=r"1 \(BatchNorm2d after 0: not folded.*-128"):
        gm = convert(model)
    assert isinstance(gm.get_submodule("1"), nn.BatchNorm2d)
    assert gm.fusions["0"].bn is None and not gm.fusions["0"].relu
    with torch.no_grad():
        got, ref = gm(x), model(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------------------------------
# what is not fused, and the fallback

class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:            # data-dependent control flow
            x = x * 2
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_untraceable_model_falls_back_to_layer_by_layer():
    x = torch.randn(4, 3, 8, 8)
    model = _prepare(_Untraceable(), x)
    with pytest.warns(ConversionWarning, match=r"cannot trace _Untraceable.*layer by layer"):
        conv = convert(model)
    assert type(conv) is _Untraceable
    assert isinstance(conv.conv, QConv2dInt) and isinstance(conv.fc, QLinearInt)
    assert isinstance(conv.bn, nn.BatchNorm2d)
    with torch.no_grad():
        ref, got = model(x), conv(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_inplace_and_fuse_arguments():
    x = torch.randn(4, 6, 10, 10)
    model = _prepare(_Block("F.relu"), x)
    with pytest.raises(ValueError, match="fuse=True.*inplace"):
        convert(model, inplace=True, fuse=True)
    plain = convert(model, fuse=False)
    assert type(plain) is _Block and isinstance(plain.conv1, QConv2dInt)
    assert isinstance(model.conv1, QuantConv2d)
    with pytest.raises(TypeError, match="fuse"):
        convert(model, fuse="yes")
    same = convert(model, inplace=True)
    assert same is model and isinstance(model.conv1, QConv2dInt)


def test_shared_and_multi_use_layers_stay_unfused():
    """A layer called twice keeps float input and output; an output read twice is float."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = F.relu(self.bn(self.head(x)))
            return self.conv(self.conv(h)) + h.mean()

    x = torch.randn(4, 4, 6, 6)
    model = _prepare(Shared(), x, first_last_bits=None)
    gm = convert(model)
    f = gm.fusions
    assert f["conv"] == type(f["conv"])()          # nothing fused into a shared layer
    assert f["head"].bn == "bn" and f["head"].relu and f["head"].out_codes is None
    with torch.no_grad():
        assert torch.equal(gm(x), _reference(gm, x))
    diverged, _ = _compare_with_fake_quant(model, gm, x)
    assert diverged <= 0.25


# ------------------------------------------------------------------------------------------
# the packed file of a fused graph

def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_fused_zoo_graph_round_trip(tmp_path):
    torch.manual_seed(5)
    x = torch.randn(8, 3, 16, 16)
    model = _prepare(models.create("resnet20", image_size=16, blocks_per_stage=1), x)
    gm = convert(model)
    p = tmp_path / "r20.safetensors"
    save_packed(gm, p)
    loaded = load_packed(p)               # the zoo description rebuilds it alone
    assert isinstance(loaded, IntegerGraph) and loaded.code == gm.code
    assert loaded.fusions == gm.fusions and loaded.source == gm.source
    _same_state(gm, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    # saving the fake-quant model converts it the same way
    save_packed(model, tmp_path / "fq.safetensors")
    assert (tmp_path / "fq.safetensors").read_bytes() == p.read_bytes()


def _sequential():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def test_sequential_and_torchvision_round_trip_into_the_callers_structure(tmp_path):
    torch.manual_seed(6)
    x = torch.randn(8, 3, 8, 8)
    model = _prepare(_sequential(), x)
    gm = convert(model)
    _assert_fully_integer(gm)
    p = tmp_path / "seq.safetensors"
    save_packed(gm, p)
    with pytest.raises(ValueError, match="load_packed\\(path, model=...\\)"):
        load_packed(p)
    # the structure: the quantized float model (not calibrated) or the float model itself
    for structure in (oqfl_ext.quantize_model(_sequential()), _sequential()):
        loaded = load_packed(p, model=structure)
        assert loaded.fusions == gm.fusions
        _same_state(gm, loaded)
        with torch.no_grad():
            assert torch.equal(loaded(x), gm(x))
    assert isinstance(structure[0], nn.Conv2d)        # the caller's model is not modified

    tv = _prepare(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    tv_gm = convert(tv)
    save_packed(tv_gm, tmp_path / "r18.safetensors")
    loaded = load_packed(tmp_path / "r18.safetensors",
                         model=oqfl_ext.quantize_model(torchvision.models.resnet18(num_classes=10)))
    _same_state(tv_gm, loaded)
    xs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(xs), tv_gm(xs))


def test_load_packed_refuses_a_structure_that_does_not_match(tmp_path):
    torch.manual_seed(7)
    x = torch.randn(8, 3, 8, 8)
    model = _prepare(_sequential(), x)
    p = tmp_path / "seq.safetensors"
    save_packed(model, p)

    def larger_kernel():
        s = _sequential()
        s[4] = nn.Conv2d(8, 8, 5, padding=2)
        return s

    def other_shape():
        s = _sequential()
        s[8] = nn.Linear(8 * 4 * 4, 6)
        return s

    def extra_layer():
        s = _sequential()
        s.append(nn.Linear(5, 5))
        return s

    def no_relu():
        s = _sequential()
        s[2] = nn.Tanh()
        return s

    def not_traceable():
        class Net(nn.Sequential):
            def forward(self, x):
                y = super().forward(x)
                return y if x.sum() > 0 else -y
        return Net(*_sequential())

    cases = [
        (larger_kernel(), r"entry '4.w_codes' is codes \[288\] in the file, the model needs "
                          r"codes \[800\]"),
        (other_shape(), r"entry '8.w_codes' is codes \[640\] in the file, the model needs "
                        r"codes \[768\]"),
        (extra_layer(), r"missing from the file \['9.weight', '9.bias'\]"),
        (oqfl_ext.quantize_model(_sequential(), weight_bits=8), "layer '4': the model has "
                                                              "weight_bits=8, the file 4"),
        (oqfl_ext.quantize_model(_sequential(), first_last_bits=None),
         "layer '0': the model has weight_bits=4, the file 8"),
        (oqfl_ext.quantize_model(_sequential(), overrides={"4": {"act_signed": True}}),
         "layer '4': the model has act_signed=True, the file False"),
        (no_relu(), r"fused graph does not match the file's: layer '0'.*'relu': \(True, "
                    r"False\)"),
        (not_traceable(), r"the file holds a fused graph, but torch.fx cannot trace Net"),
        (nn.Linear(3, 3), r"architecture layer '0': the model has no Conv2d/Linear"),
    ]
    for i, (structure, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match) as e:
            load_packed(p, model=structure)
        assert str(p) in str(e.value), i
    with pytest.raises(TypeError, match="model expected an nn.Module"):
        load_packed(p, model="seq")


# ------------------------------------------------------------------------------------------
# a trained model on real data

def test_trained_fashion_mnist_models_keep_their_predictions():
    """SmallCNN trained briefly (W4A4, 8-bit first and last layers) on Fashion-MNIST: the
    converted graph gives the fake-quant model's class on >= 99.9 % of the 10000 test
    images."""
    from oqfl_ext.data import fashion_mnist_dir, load_fashion_mnist
    if fashion_mnist_dir() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x_train, y_train = load_fashion_mnist("train", limit=2000, normalize=True)
    x_test, _ = load_fashion_mnist("test", normalize=True)
    for name, kwargs in (("small_cnn", dict(width=8)),):
        torch.manual_seed(0)
        model = oqfl_ext.quantize_model(models.create(name, in_channels=1, image_size=28,
                                                      **kwargs))
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        model.train()
        for i in range(0, len(x_train), 64):
            loss = F.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        gm = convert(model)
        _assert_fully_integer(gm)
        with torch.no_grad():
            same = sum(int((gm(x_test[i:i + 1000]).argmax(1)
                            == model(x_test[i:i + 1000]).argmax(1)).sum())
                       for i in range(0, len(x_test), 1000))
        assert same / len(x_test) >= 0.999, (name, same)


@requires_cuda
def test_cuda_graph_matches_cpu():
    """The same integers on the GPU (its fused epilogue); the float rescale may round by an
    ulp differently there, which can move a code at a rounding tie."""
    torch.manual_seed(8)
    x = torch.randn(8, 6, 10, 10)
    gm = convert(_prepare(_Block("nn.ReLU6"), x))
    with torch.no_grad():
        want = gm(x)
        got = gm.to("cuda")(x.cuda()).cpu()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.75
    close = ((got - want).abs() <= 1e-4 * want.abs().max()).float().mean()
    assert close >= 0.9, close
