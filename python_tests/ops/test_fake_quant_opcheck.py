"""torch.library.opcheck on both ops (schema, fake kernel, autograd registration, AOT dispatch)
and torch.compile(fullgraph=True) of code that uses fake_quant, forward and backward."""

from __future__ import annotations

import pytest
import torch

import helpers as h
from oqfl_ext import ops as oq

QMIN, QMAX = h.bit_range(4, True)


def _inputs(device, dtype, axis, with_zp, shape=(4, 6, 5)):
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, device)
    z = h.int_zero_point(pshape, QMIN, QMAX, device) if with_zp else None
    x = h.dyadic_x(shape, s, z, QMIN, QMAX, dtype, device, axis=axis)
    return x, s, z


# Every requires_grad choice, except differentiating a zero_point that is not there.
GRAD_CASES = [(zp, rg) for zp in (True, False)
              for rg in ("none", "x", "scale", "zero_point", "all") if zp or rg != "zero_point"]


@pytest.mark.parametrize("with_zp,requires_grad", GRAD_CASES)
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_fake_quant(plain_device, dtype, axis, with_zp, requires_grad):
    x, s, z = _inputs(plain_device, dtype, axis, with_zp)
    for name, t in (("x", x), ("scale", s), ("zero_point", z)):
        if t is not None and requires_grad in (name, "all"):
            t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.oqfl.fake_quant.default, (x, s, z),
        dict(quant_min=QMIN, quant_max=QMAX, axis=axis, grad_factor=0.5))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, True], [False, True, False],
                                  [False, False, False]], ids=str)
@pytest.mark.parametrize("with_zp", [True, False])
@pytest.mark.parametrize("axis", [None, 1])
def test_opcheck_fake_quant_backward(plain_device, axis, with_zp, mask):
    x, s, z = _inputs(plain_device, torch.float32, axis, with_zp)
    dy = h.dyadic_dy(x.shape, x.dtype, plain_device)
    torch.library.opcheck(
        torch.ops.oqfl.fake_quant_backward.default, (dy, x, s, z),
        dict(quant_min=QMIN, quant_max=QMAX, axis=axis, grad_factor=0.5, output_mask=mask))


def test_opcheck_empty(plain_device):
    x = torch.empty(0, 3, device=plain_device, requires_grad=True)
    s = torch.full((3,), 0.5, device=plain_device, requires_grad=True)
    z = torch.zeros(3, device=plain_device, requires_grad=True)
    torch.library.opcheck(torch.ops.oqfl.fake_quant.default, (x, s, z),
                          dict(quant_min=0, quant_max=15, axis=1, grad_factor=1.0))


class _QuantLayer(torch.nn.Module):
    """A learnable per-channel quantizer followed by ordinary ops, as in a QAT model."""

    def __init__(self, channels, device):
        super().__init__()
        self.scale = torch.nn.Parameter(h.pow2_scale((channels,), device))
        self.zero_point = torch.nn.Parameter(h.int_zero_point((channels,), QMIN, QMAX, device))
        self.weight = torch.nn.Parameter(torch.randn(channels, device=device))

    def forward(self, x):
        q = oq.fake_quant(x, self.scale, self.zero_point, quant_min=QMIN, quant_max=QMAX,
                          axis=1, grad_factor=oq.lsq_grad_factor(x.shape[0], QMAX))
        return torch.relu(q * self.weight + 1.0)


def _grads(module, x, dy):
    module.zero_grad()
    xr = x.detach().clone().requires_grad_(True)
    y = module(xr)
    y.backward(dy)
    return [y.detach(), xr.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_module_matches_eager(plain_device, backend):
    torch._dynamo.reset()
    layer = _QuantLayer(6, plain_device)
    x = h.dyadic_x((16, 6), layer.scale, layer.zero_point, QMIN, QMAX, torch.float32,
                   plain_device, axis=1)
    dy = h.dyadic_dy((16, 6), torch.float32, plain_device)
    eager = _grads(layer, x, dy)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    got = _grads(compiled, x, dy)
    names = ["y", "grad_x", "grad_scale", "grad_zero_point", "grad_weight"]
    for name, a, b in zip(names, got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert eager[2].abs().sum() > 0  # the scale gradient actually flows


def test_compile_per_tensor_function(plain_device):
    # per-tensor, no zero_point, a 0-d scale; inductor fuses the ops around the custom op
    torch._dynamo.reset()

    def f(x, s):
        return (oq.fake_quant(x * 2.0, s, quant_min=0, quant_max=255) - x).square().sum()

    s = torch.tensor(2.0 ** -5, device=plain_device)
    x = (torch.randint(-64, 640, (257,), device=plain_device) / 64).float()
    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xr = x.clone().requires_grad_(True)
        sr = s.clone().requires_grad_(True)
        loss = fn(xr, sr)
        loss.backward()
        outs.append((loss.detach(), xr.grad, sr.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert outs[0][2].shape == ()


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "step_slice", "expanded"])
@pytest.mark.parametrize("axis", [None, 1])
def test_opcheck_layouts(plain_device, layout, axis):
    # the fake kernel must predict the real kernel's output strides for every layout
    x4 = h.dyadic_x((2, 3, 4, 5), torch.ones(()), None, QMIN, QMAX, torch.float32,
                    plain_device)
    x = {
        "transposed": lambda: x4.transpose(1, 3),
        "channels_last": lambda: x4.contiguous(memory_format=torch.channels_last),
        "step_slice": lambda: x4[:, :, ::2, 1:],
        "expanded": lambda: x4[:1].expand(3, 3, 4, 5),
    }[layout]()
    pshape = () if axis is None else (x.shape[axis],)
    s = torch.full(pshape, 0.5, device=plain_device, requires_grad=True)
    kw = dict(quant_min=QMIN, quant_max=QMAX, axis=axis, grad_factor=1.0)
    torch.library.opcheck(torch.ops.oqfl.fake_quant.default, (x, s, None), kw)
    dy = torch.ones_like(x)
    torch.library.opcheck(torch.ops.oqfl.fake_quant_backward.default,
                          (dy, x.detach(), s.detach(), None), dict(kw, output_mask=[True] * 3))


def _qconv_epilogue_inputs(device, channels_last):
    torch.manual_seed(7)
    x = torch.rand(2, 8, 6, 5, device=device) * 4 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (12, 4, 3, 3), dtype=torch.int8)
    args = (x, torch.tensor(2.0 ** -5, device=device), torch.tensor(32, device=device),
            oq.pack_conv_weight(w, 8, groups=2).to(device),
            (torch.rand(12) * 0.01 + 1e-3).to(device), torch.randn(12, device=device))
    return args, torch.randn(2, 12, 6, 5, device=device)


# the fused epilogue (qconv_args.h): residual, relu + clamp_max, float or uint8 / int8 codes
EPILOGUE_KWARGS = [
    dict(relu=True, clamp_max=6.0),
    dict(residual=True),
    dict(residual=True, relu=True, out_scale=0.05, out_zero_point=3),
    dict(clamp_max=0.5, out_scale=0.02, out_zero_point=-2, out_quant_min=-8, out_quant_max=7),
]


def _epilogue_kwargs(spec, residual, device):
    kw = dict(spec)
    if kw.pop("residual", False):
        kw["residual"] = residual
    if "out_scale" in kw:
        kw["out_scale"] = torch.tensor(kw["out_scale"], device=device)
        kw["out_zero_point"] = torch.tensor(kw["out_zero_point"], device=device)
    return kw


@pytest.mark.parametrize("spec", EPILOGUE_KWARGS, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_qconv2d_epilogue(plain_device, channels_last, spec):
    args, residual = _qconv_epilogue_inputs(plain_device, channels_last)
    kw = dict(w_bits=8, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2,
              **_epilogue_kwargs(spec, residual, plain_device))
    torch.library.opcheck(torch.ops.oqfl.qconv2d.default, args, kw)


@pytest.mark.parametrize("spec", EPILOGUE_KWARGS, ids=str)
def test_opcheck_qlinear_epilogue(plain_device, spec):
    torch.manual_seed(8)
    x = torch.rand(3, 4, 20, device=plain_device)
    w = torch.randint(-8, 8, (12, 20), dtype=torch.int8)
    args = (x, torch.tensor(2.0 ** -6, device=plain_device),
            torch.tensor(0, device=plain_device), oq.pack_linear_weight(w, 4).to(plain_device),
            torch.full((12,), 0.05, device=plain_device), None)
    residual = torch.randn(3, 4, 12, device=plain_device)
    kw = dict(w_bits=4, **_epilogue_kwargs(spec, residual, plain_device))
    torch.library.opcheck(torch.ops.oqfl.qlinear.default, args, kw)
