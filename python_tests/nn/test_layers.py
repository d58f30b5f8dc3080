"""oqfl_ext.nn: LSQQuantizer, QuantConv2d, QuantLinear against independent references (float64
fake quantization of reference.py followed by F.conv2d / F.linear, PyTorch's learnable
fake-quantize op, the float layers), plus state_dict, initialization, the step-size guard,
channels_last, autocast, opcheck and torch.compile."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference as ref
from conftest import requires_cuda
from oqfl_ext import ops
from oqfl_ext.nn import (MAX_STEP, MIN_STEP, LSQQuantizer, QuantConv2d, QuantLinear, bit_range,
                         calibrate)


def _expect(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", str(info.value)), \
        str(info.value)


def _set_params(q: LSQQuantizer, step, offset=None):
    """Overwrite a quantizer's step size (and offset) after it was initialized."""
    with torch.no_grad():
        q.step_size.copy_(torch.as_tensor(step, dtype=torch.float32).reshape(q.step_size.shape))
        if offset is not None:
            q.offset.copy_(torch.as_tensor(offset, dtype=torch.float32).reshape(q.offset.shape))


def _pow2(shape, lo=-6, hi=-2):
    return torch.pow(2.0, torch.randint(lo, hi + 1, shape).float())


def _dequant_ref(q: LSQQuantizer, x):
    """float64 fake quantization of x with the quantizer's current parameters (reference.py)."""
    s, z = q.quant_params()
    return ref.fake_quant_ref(x, s, z, quant_min=q.quant_min, quant_max=q.quant_max,
                              axis=q.per_channel_axis)


# ---------------------------------------------------------------- arguments


def test_bit_range():
    assert bit_range(4, True) == (-8, 7)
    assert bit_range(4, False) == (0, 15)
    assert bit_range(2, True) == (-2, 1)
    assert bit_range(8, False) == (0, 255)
    for bad in (1, 9, 0, 4.0, "4", True, None):
        _expect(ValueError, "bits", lambda: bit_range(bad, True))


def test_bad_arguments():
    _expect(ValueError, "bits", lambda: LSQQuantizer(9, True))
    _expect(ValueError, "signed", lambda: LSQQuantizer(4, "yes"))
    _expect(ValueError, "num_channels", lambda: LSQQuantizer(4, True, per_channel_axis=0))
    _expect(ValueError, "num_channels", lambda: LSQQuantizer(4, True, num_channels=3))
    _expect(ValueError, "per_channel_axis",
            lambda: LSQQuantizer(4, True, per_channel_axis="0", num_channels=3))
    _expect(ValueError, "init", lambda: LSQQuantizer(4, True, init="minmax"))
    _expect(ValueError, "grad_factor", lambda: LSQQuantizer(4, True, grad_factor=-1.0))
    _expect(ValueError, "weight_bits", lambda: QuantConv2d(3, 4, 3, weight_bits=1))
    _expect(ValueError, "act_bits", lambda: QuantLinear(3, 4, act_bits=16))
    _expect(ValueError, "act_signed", lambda: QuantLinear(3, 4, act_signed=1))
    _expect(TypeError, "module", lambda: QuantConv2d.from_float(nn.Linear(3, 4)))
    _expect(TypeError, "module", lambda: QuantLinear.from_float(nn.Conv2d(3, 4, 1)))
    q = LSQQuantizer(4, True, per_channel_axis=0, num_channels=3)
    _expect(ValueError, "input", lambda: q(torch.randn(4, 5)))
    _expect(TypeError, "input", lambda: q(torch.ones(3, 2, dtype=torch.int32)))


# ---------------------------------------------------------------- initialization


@pytest.mark.parametrize("signed,axis", [(True, None), (False, None), (True, 0), (True, 1)])
def test_init_lsq_rule(signed, axis):
    x = torch.randn(6, 5, 4)
    if not signed:
        x = x.abs()
    c = None if axis is None else x.shape[axis]
    q = LSQQuantizer(3, signed, per_channel_axis=axis, num_channels=c, init="lsq")
    q(x)
    qmax = bit_range(3, signed)[1]
    if axis is None:
        want = 2 * x.abs().mean() / math.sqrt(qmax)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        want = 2 * x.abs().mean(dim=dims) / math.sqrt(qmax)
    torch.testing.assert_close(q.step_size.detach(), want.reshape(q.step_size.shape))
    assert q.is_initialized() and bool(q.initialized) and q.is_signed == signed


def _mse(x, s, z, qmin, qmax, axis):
    y = ref.fake_quant_ref(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    d = (y - x.double()).square()
    return d.sum() if axis is None else d.sum(dim=[i for i in range(x.dim()) if i != axis])


@pytest.mark.parametrize("case", ["signed", "unsigned", "offset", "per_channel"])
def test_init_mse_rule_minimizes_error(case):
    # an independent float64 search over the documented candidates full * k/64
    # 2000 Gaussian values per row: enough that clipping the tails beats min/max for any seed
    x = torch.randn(8, 2000) * torch.linspace(0.2, 3, 8)[:, None]
    x[0, 0] = 12.0  # an outlier: the best range clips it
    signed, axis, learn_offset = {"signed": (True, None, False), "unsigned": (False, None, False),
                                  "offset": (True, None, True),
                                  "per_channel": (True, 0, False)}[case]
    if case == "unsigned":
        x = x.abs()
    if case == "offset":
        x = x + 1.5  # mostly positive, some negative: an asymmetric range
    q = LSQQuantizer(4, signed, per_channel_axis=axis, learn_offset=learn_offset,
                     num_channels=None if axis is None else 8)
    q(x)
    qmin, qmax = bit_range(4, signed)
    x64 = x.double()
    red = (lambda t, f: f(t)) if axis is None else (lambda t, f: f(t, dim=1))
    lo = red(x64, torch.amin).clamp(max=0)
    hi = red(x64, torch.amax).clamp(min=0)
    z = None
    if learn_offset:
        z = torch.round(qmin - lo * (qmax - qmin) / (hi - lo)).float().reshape(1)
        torch.testing.assert_close(q.offset.detach(), z)
        full = (hi - lo) / (qmax - qmin)
    else:
        full = (torch.maximum(-lo, hi) if signed else hi) / qmax
    errs = torch.stack([_mse(x, (full * k / 64).float().reshape(-1), z, qmin, qmax, axis)
                        for k in range(1, 65)])
    got = _mse(x, q.step_size.detach(), z, qmin, qmax, axis)
    best = errs.min(dim=0).values
    assert torch.all(got <= best * (1 + 1e-5) + 1e-12), (got, best)
    # and it beats the plain min/max range (where the outlier does not dominate)
    assert torch.all(got <= errs[-1]) and torch.any(got < 0.9 * errs[-1])


def test_auto_signedness_from_first_batch():
    pos = LSQQuantizer(4, None, learn_offset=True)
    pos(torch.rand(100))
    assert pos.is_signed is False and pos.quant_params()[1] is None
    assert (pos.quant_min, pos.quant_max) == (0, 15)

    mixed = LSQQuantizer(4, None, learn_offset=True)
    x = torch.randn(100) + 1.0
    mixed(x)
    assert mixed.is_signed is True and (mixed.quant_min, mixed.quant_max) == (-8, 7)
    s, z = mixed.quant_params()
    assert z is not None and z.item() == round(z.item())  # integer start: 0 is on the grid
    zero = ops.fake_quant(torch.zeros(3), s, z, quant_min=-8, quant_max=7)
    assert torch.equal(zero, torch.zeros(3))
    # a later batch does not re-initialize
    before = mixed.step_size.detach().clone()
    mixed(100 * x)
    assert torch.equal(mixed.step_size.detach(), before)


def test_empty_first_batch_defers_initialization():
    q = LSQQuantizer(4, None, learn_offset=True)
    out = q(torch.empty(0, 3))
    assert out.shape == (0, 3) and not q.is_initialized() and q.is_signed is None
    q(torch.rand(5, 3))
    assert q.is_initialized() and q.is_signed is False


# ---------------------------------------------------------------- layers vs references


def _init_conv(device="cpu", **kw):
    conv = QuantConv2d(4, 6, 3, padding=1, stride=2, bias=True, device=device, **kw)
    x = torch.randn(3, 4, 9, 9, device=device)
    conv(x)  # initializes
    return conv, x


@pytest.mark.parametrize("act_signed", [None, True, False])
def test_quant_conv2d_matches_conv_on_dequantized(plain_device, act_signed):
    conv, x = _init_conv(plain_device, act_signed=act_signed)
    if act_signed is False:
        x = x.relu()
    # power-of-two step sizes and an integer offset: x/s is exact, so the float32 kernels and
    # the float64 reference round every element the same way
    _set_params(conv.weight_quantizer, _pow2((6,)))
    _set_params(conv.act_quantizer, 2.0 ** -3, 3.0 if conv.act_quantizer.uses_offset else None)
    y = conv(x)
    xq = _dequant_ref(conv.act_quantizer, x)
    wq = _dequant_ref(conv.weight_quantizer, conv.weight)
    want = F.conv2d(xq, wq, conv.bias.double(), stride=2, padding=1)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert conv.act_quantizer.is_signed == (act_signed is not False)


def test_quant_linear_matches_linear_on_dequantized(plain_device):
    lin = QuantLinear(10, 7, device=plain_device, weight_bits=3, act_bits=5)
    x = torch.randn(2, 4, 10, device=plain_device)  # any leading dims
    lin(x)
    _set_params(lin.weight_quantizer, _pow2((7,)))
    _set_params(lin.act_quantizer, 2.0 ** -4, -2.0)
    y = lin(x)
    want = F.linear(_dequant_ref(lin.act_quantizer, x),
                    _dequant_ref(lin.weight_quantizer, lin.weight), lin.bias.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 4, 7)


def test_weights_only_and_float():
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(2, 3, 8, 8)
    float_q = QuantConv2d.from_float(conv, weight_bits=None, act_bits=None)
    assert float_q.weight_quantizer is None and float_q.act_quantizer is None
    torch.testing.assert_close(float_q(x), conv(x), rtol=0, atol=0)
    w_only = QuantConv2d.from_float(conv, weight_bits=2, act_bits=None)
    y = w_only(x)
    want = F.conv2d(x.double(), _dequant_ref(w_only.weight_quantizer, w_only.weight),
                    conv.bias.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, conv(x), atol=1e-3)  # 2-bit weights do change the output


@pytest.mark.parametrize("kind", ["conv", "linear", "depthwise"])
def test_from_float_8bit_close_to_float(kind):
    if kind == "conv":
        f = nn.Conv2d(8, 16, 3, padding=1)
        x = torch.randn(4, 8, 12, 12)
    elif kind == "depthwise":
        f = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        x = torch.randn(4, 8, 12, 12).relu()
    else:
        f = nn.Linear(64, 10)
        x = torch.randn(16, 64)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    q = cls.from_float(f, weight_bits=8, act_bits=8)
    assert torch.equal(q.weight, f.weight) and q.weight is not f.weight
    with torch.no_grad():
        want, got = f(x), q(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02, rel  # ~40 dB: the signal-to-noise ratio of 8-bit codes
    q4 = cls.from_float(f, weight_bits=4, act_bits=4)
    with torch.no_grad():
        rel4 = (q4(x) - want).norm() / want.norm()
    assert rel < rel4 < 0.3  # fewer bits, larger (but bounded) error


def test_from_float_keeps_configuration_and_mode():
    conv = nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1, groups=2,
                     bias=False, padding_mode="reflect").eval()
    q = QuantConv2d.from_float(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(q, attr) == getattr(conv, attr), attr
    assert q.bias is None and not q.training
    assert q(torch.randn(2, 4, 8, 8)).shape == conv(torch.randn(2, 4, 8, 8)).shape


# ---------------------------------------------------------------- gradients


def test_gradients_match_pytorch_learnable_fake_quantize():
    """Gradients of every parameter of a QuantLinear against the same layer written with
    PyTorch's learnable fake-quantize ops (power-of-two steps, an even non-negative offset,
    where the two definitions agree) and the same LSQ grad factors."""
    lin = QuantLinear(12, 5, weight_bits=4, act_bits=4, act_signed=True)
    x = torch.randn(6, 12)
    lin(x)
    _set_params(lin.weight_quantizer, _pow2((5,), -5, -3))
    _set_params(lin.act_quantizer, 2.0 ** -2, 2.0)
    dy = torch.randn(6, 5)

    xr = x.clone().requires_grad_(True)
    lin.zero_grad()
    lin(xr).backward(dy)
    ours = dict(x=xr.grad, weight=lin.weight.grad, bias=lin.bias.grad,
                w_step=lin.weight_quantizer.step_size.grad,
                a_step=lin.act_quantizer.step_size.grad, a_offset=lin.act_quantizer.offset.grad)

    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    ws = lin.weight_quantizer.step_size.detach().clone().requires_grad_(True)
    a_s = lin.act_quantizer.step_size.detach().clone().requires_grad_(True)
    a_z = lin.act_quantizer.offset.detach().clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    g_act = 1 / math.sqrt(x.numel() * 7)           # N_s = every element of the batch
    g_w = 1 / math.sqrt(12 * 7)                     # N_s = elements per output channel
    xq = torch._fake_quantize_learnable_per_tensor_affine(xp, a_s, a_z, -8, 7, g_act)
    wq = torch._fake_quantize_learnable_per_channel_affine(w, ws, torch.zeros(5), 0, -8, 7, g_w)
    F.linear(xq, wq, b).backward(dy)
    peer = dict(x=xp.grad, weight=w.grad, bias=b.grad, w_step=ws.grad, a_step=a_s.grad,
                a_offset=a_z.grad)
    for name in ours:
        torch.testing.assert_close(ours[name], peer[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
        assert ours[name].abs().sum() > 0, name  # every gradient actually flows


def test_grad_factor_default_and_override():
    q = LSQQuantizer(4, True, per_channel_axis=1, num_channels=3)
    x = torch.randn(5, 3, 2)
    q(x)
    assert q.op_kwargs(x)["grad_factor"] == pytest.approx(ops.lsq_grad_factor(10, 7))
    q.grad_factor = 0.25
    assert q.op_kwargs(x)["grad_factor"] == 0.25
    s1 = q.step_size.detach()
    xr = x.clone()
    q.step_size.grad = None
    q(xr).sum().backward()
    g_quarter = q.step_size.grad.clone()
    q.grad_factor = 0.5
    q.step_size.grad = None
    q(xr).sum().backward()
    torch.testing.assert_close(q.step_size.grad, 2 * g_quarter)
    assert torch.equal(q.step_size.detach(), s1)


# ---------------------------------------------------------------- step-size guard


def test_step_guard_values_and_gradient():
    q = LSQQuantizer(4, True)
    q(torch.randn(10))
    for raw, used in ((-0.5, 0.5), (0.0, MIN_STEP), (-1e-20, MIN_STEP), (math.inf, MAX_STEP),
                      (-math.inf, MAX_STEP), (3e7, MAX_STEP), (0.25, 0.25)):
        _set_params(q, raw)
        s, _ = q.quant_params()
        assert s.item() == pytest.approx(used, rel=1e-6), raw
    # the gradient reaching the raw parameter is that of |step| (sign flipped below zero), and
    # it passes through the bounds, so a collapsed step size can recover
    x = torch.randn(50)
    for raw in (-0.3, 0.3, 1e-12):
        _set_params(q, raw)
        q.step_size.grad = None
        q(x).square().sum().backward()
        g = q.step_size.grad.item()
        _set_params(q, abs(raw) if raw != 1e-12 else MIN_STEP)
        q.step_size.grad = None
        q(x).square().sum().backward()
        g_pos = q.step_size.grad.item()
        assert g == pytest.approx(-g_pos if raw < 0 else g_pos, rel=1e-6) and g != 0


def test_nan_step_is_reported_not_hidden():
    q = LSQQuantizer(4, True)
    q(torch.randn(10))
    _set_params(q, math.nan)
    with pytest.raises(ValueError, match="scale"):
        q(torch.randn(10))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_step_sizes_stay_positive_under_aggressive_lr(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d(3, 8, 3, padding=1, weight_bits=3, act_bits=3),
                          nn.ReLU(), nn.Flatten(), QuantLinear(8 * 6 * 6, 4, weight_bits=3,
                                                               act_bits=3))
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    opt = (torch.optim.SGD(model.parameters(), lr=50.0, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1.0))
    x = torch.randn(16, 3, 6, 6)
    y = torch.randint(0, 4, (16,))
    crossed = False
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for q in quantizers:
            s, _ = q.quant_params()
            assert torch.isfinite(s).all() and (s > 0).all(), s
            assert torch.isfinite(q.step_size).all()
            crossed |= bool((q.step_size <= MIN_STEP).any())
    assert crossed, "the learning rate never pushed a step size to or below zero"
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ---------------------------------------------------------------- state_dict and switches


def test_state_dict_round_trip():
    x = torch.randn(3, 4, 9, 9) - 0.5  # negative values: signed input codes with an offset
    fresh_conv = QuantConv2d(4, 6, 3, padding=1, stride=2)
    fresh_conv.load_state_dict(QuantConv2d(4, 6, 3, padding=1, stride=2).state_dict())
    conv = QuantConv2d(4, 6, 3, padding=1, stride=2)
    conv(x)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(x).square().mean().backward()
    opt.step()
    sd = conv.state_dict()
    plain = set(nn.Conv2d(4, 6, 3).state_dict())
    assert plain <= set(sd)
    assert set(sd) - plain == {
        "weight_quantizer.step_size", "weight_quantizer.initialized", "weight_quantizer.signed",
        "act_quantizer.step_size", "act_quantizer.offset", "act_quantizer.initialized",
        "act_quantizer.signed"}
    assert bool(sd["act_quantizer.initialized"]) and bool(sd["act_quantizer.signed"])

    other = QuantConv2d(4, 6, 3, padding=1, stride=2)
    other.load_state_dict(sd)
    assert other.act_quantizer.is_initialized() and other.act_quantizer.is_signed is True
    x2 = 5 * torch.randn(3, 4, 9, 9)  # a very different batch must not re-initialize it
    torch.testing.assert_close(other(x2), conv(x2), rtol=0, atol=0)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    # an uninitialized state stays uninitialized
    assert not fresh_conv.act_quantizer.is_initialized()
    fresh_conv(x.relu())
    assert fresh_conv.act_quantizer.is_signed is False


def test_state_dict_signedness_mismatch_is_an_error():
    q = LSQQuantizer(4, True)
    q(torch.randn(10))
    other = LSQQuantizer(4, False)
    with pytest.raises(RuntimeError, match="signed"):
        other.load_state_dict(q.state_dict())


def test_enabled_switch_is_identity():
    conv = QuantConv2d(3, 4, 3, padding=1)
    for q in (conv.weight_quantizer, conv.act_quantizer):
        q.enabled = False
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1),
                               rtol=0, atol=0)
    assert not conv.act_quantizer.is_initialized()  # no initialization while disabled
    conv.act_quantizer.enabled = conv.weight_quantizer.enabled = True
    assert not torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_calibrate_initializes_without_touching_batch_norm():
    model = nn.Sequential(QuantConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          QuantConv2d(4, 4, 3))
    bn_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    calibrate(model, torch.randn(4, 3, 8, 8))
    assert all(m.is_initialized() for m in model.modules() if isinstance(m, LSQQuantizer))
    assert model[3].act_quantizer.is_signed is False  # after the ReLU
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, bn_before[k]), k
    assert model.training


# ---------------------------------------------------------------- layouts, autocast, CUDA


def test_channels_last():
    conv, x = _init_conv()
    ref_y = conv(x)
    conv_cl = QuantConv2d(4, 6, 3, padding=1, stride=2)
    conv_cl.load_state_dict(conv.state_dict())
    conv_cl = conv_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = conv_cl(x_cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    conv(xr).sum().backward()
    torch.testing.assert_close(x_cl.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv_cl.act_quantizer.step_size.grad,
                               conv.act_quantizer.step_size.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.float16,
                                                       marks=requires_cuda)])
def test_autocast(device, dtype):
    model = nn.Sequential(QuantConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          QuantLinear(8 * 6 * 6, 5)).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    y32 = model(x)  # initializes, in float32
    with torch.autocast(device, dtype=dtype):
        y = model(x)
        assert y.dtype == dtype
        # the reference: the same layers run on quantized tensors, conv/linear autocast
        conv, lin = model[0], model[3]
        h = F.relu(F.conv2d(conv.act_quantizer(x), conv.quantized_weight(), conv.bias,
                            padding=1))
        want = F.linear(lin.act_quantizer(h.flatten(1)), lin.quantized_weight(), lin.bias)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    # half precision changes a few codes and the products: close to float32, not equal
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()
    y.float().sum().backward()
    for q in (conv.weight_quantizer, conv.act_quantizer, lin.act_quantizer):
        assert q.step_size.grad is not None and torch.isfinite(q.step_size.grad).all()
        assert q.step_size.grad.dtype == torch.float32


@requires_cuda
def test_cuda_matches_cpu():
    device = "cuda"
    conv, x = _init_conv()
    conv_cuda = QuantConv2d(4, 6, 3, padding=1, stride=2, device=device)
    conv_cuda.load_state_dict(conv.state_dict())
    _set_params(conv.act_quantizer, 2.0 ** -3, 2.0)
    _set_params(conv_cuda.act_quantizer, 2.0 ** -3, 2.0)
    xc = x.to(device).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y_cuda, y = conv_cuda(xc), conv(xr)
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-4)
    y_cuda.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv_cuda.act_quantizer.step_size.grad.cpu(),
                               conv.act_quantizer.step_size.grad, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- opcheck and torch.compile


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_module_calls(plain_device, requires_grad):
    """opcheck on the exact op calls the modules make (their shapes, layouts and arguments)."""
    conv = QuantConv2d(4, 6, 3, padding=1, device=plain_device, act_signed=True)
    lin = QuantLinear(6, 3, device=plain_device)
    x = torch.randn(2, 4, 5, 5, device=plain_device).contiguous(
        memory_format=torch.channels_last)
    conv(x)
    lin(torch.rand(7, 6, device=plain_device))
    calls = [(conv.act_quantizer, x), (conv.weight_quantizer, conv.weight.detach()),
             (lin.act_quantizer, torch.rand(7, 6, device=plain_device)),
             (lin.weight_quantizer, lin.weight.detach())]
    for q, inp in calls:
        s, z = q.quant_params()
        args = [inp.clone().requires_grad_(requires_grad), s.detach().requires_grad_(requires_grad),
                None if z is None else z.detach().requires_grad_(requires_grad)]
        torch.library.opcheck(torch.ops.oqfl.fake_quant.default, tuple(args), q.op_kwargs(inp))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y = model(xr)
    y.square().mean().backward()
    return [y.detach(), xr.grad] + [p.grad.clone() for p in model.parameters()
                                    if p.grad is not None]


def _small_net(device, act_signed=None):
    return nn.Sequential(QuantConv2d(3, 8, 3, padding=1, act_signed=act_signed),
                         nn.BatchNorm2d(8), nn.ReLU(),
                         QuantConv2d(8, 8, 3, padding=1, groups=2, act_signed=act_signed),
                         nn.ReLU(), nn.Flatten(),
                         QuantLinear(8 * 6 * 6, 4, act_signed=act_signed)).to(device)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(plain_device, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _small_net(plain_device)
    x = torch.randn(4, 3, 6, 6, device=plain_device)
    calibrate(net, x)
    eager = _grads(net, x)
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    got = _grads(compiled, x)
    assert len(got) == len(eager) > 10
    for i, (a, b) in enumerate(zip(got, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"tensor {i}: {m}")


def test_compile_fullgraph_initializes_inside_the_graph(plain_device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _small_net(plain_device)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 6, 6, device=plain_device)
    compiled(x).sum().backward()
    quantizers = [m for m in net.modules() if isinstance(m, LSQQuantizer)]
    assert all(q.is_initialized() and bool(q.initialized) for q in quantizers)
    # while tracing the data cannot be inspected: auto-signed inputs take signed codes
    assert net[3].act_quantizer.is_signed is True
    # and the initialization matches an eager one on the same batch
    torch.manual_seed(0)
    eager_net = _small_net(plain_device, act_signed=True)  # the choice the traced graph made
    eager_net(x)
    for a, b in zip(quantizers, [m for m in eager_net.modules() if isinstance(m, LSQQuantizer)]):
        torch.testing.assert_close(a.step_size, b.step_size)


# ---------------------------------------------------------------- gradient scale per example


def _lsq_step_grad_f64(x, w, step, qmax, n_s):
    """LSQ's step-size gradient by hand in float64 for unsigned codes 0..qmax and the loss
    sum(w * fake_quant(x)): per element round(v) - v where round(v) is a code, qmin / qmax
    outside (the op's contract: values that round onto qmin / qmax are in range), times
    g = 1 / sqrt(n_s * qmax)."""
    v = x.double() / step
    inside = (torch.round(v) >= 0) & (torch.round(v) <= qmax)
    d = torch.where(inside, torch.round(v) - v, torch.where(v > qmax, float(qmax), 0.0))
    return (w.double() * d).sum() / math.sqrt(n_s * qmax), w.double() * inside


@pytest.mark.parametrize("count", ["example", "all"])
def test_input_quantizer_step_gradient_counts_one_example(count):
    torch.manual_seed(3)
    batch, features, step, qmax = 8, 3 * 5 * 5, 0.125, 15
    v = torch.rand(batch, 3, 5, 5, dtype=torch.float64) * 18       # some past qmax
    frac = v - v.floor()
    v = torch.where((frac - 0.5).abs() < 0.05, v + 0.2, v)         # no ties to round
    x = (v * step).float().requires_grad_()
    w = torch.randn(batch, 3, 5, 5)
    q = LSQQuantizer(4, False, grad_count=count)
    q.initialize(x.detach())
    _set_params(q, step)
    (q(x) * w).sum().backward()
    n_s = features if count == "example" else batch * features
    want_s, want_x = _lsq_step_grad_f64(x.detach(), w, step, qmax, n_s)
    torch.testing.assert_close(q.step_size.grad.double().sum(), want_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_x)
    assert q.op_kwargs(x)["grad_factor"] == pytest.approx(1 / math.sqrt(n_s * qmax), rel=1e-12)


def test_per_example_gradient_scale_does_not_depend_on_the_batch():
    q = LSQQuantizer(4, False, grad_count="example")
    q(torch.rand(4, 6, 7))
    factors = {round(q.op_kwargs(torch.rand(b, 6, 7))["grad_factor"], 15) for b in (1, 4, 64)}
    assert factors == {round(1 / math.sqrt(42 * 15), 15)}
    whole = LSQQuantizer(4, False)
    whole(torch.rand(4, 6, 7))
    assert whole.op_kwargs(torch.rand(64, 6, 7))["grad_factor"] == \
        pytest.approx(1 / math.sqrt(64 * 42 * 15))


def test_grad_count_is_checked():
    _expect(ValueError, "grad_count", lambda: LSQQuantizer(4, True, grad_count="batch"))
    _expect(ValueError, "grad_count",
            lambda: LSQQuantizer(4, True, per_channel_axis=0, num_channels=3,
                                 grad_count="example"))
