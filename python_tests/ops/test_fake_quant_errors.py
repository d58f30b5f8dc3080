"""Argument checking: every bad argument raises the documented exception type with a message
that names the argument and says what was expected, for both ops and on every device."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import requires_cuda
from oqfl_ext import ops as oq

QMIN, QMAX = -8, 7


def _base(device, shape=(4, 5, 6), axis=None):
    x = torch.randn(shape, device=device)
    pshape = () if axis is None else (shape[axis],)
    s = torch.full(pshape, 0.1, device=device)
    z = torch.zeros(pshape, device=device)
    return x, s, z


def _call(op, x, s, z, dy=None, **kw):
    args = dict(quant_min=QMIN, quant_max=QMAX, axis=None)
    args.update(kw)
    if op == "forward":
        return oq.fake_quant(x, s, z, **args)
    if dy is None:
        dy = torch.ones_like(x, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return oq.fake_quant_backward(dy, x, s, z, **args)


def _expect(exc, name, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    # the argument as a whole word ("scale" must not be satisfied by "grad_scale")
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg), msg
    assert "expected" in msg.lower(), msg


def _case(name, exc, arg, build):
    return pytest.param(exc, arg, build, id=name)


def _shift_x(dtype):
    def build(d):
        x, s, z = _base(d)
        return dict(x=(x * 10).to(dtype), s=s, z=z)
    return build


def _scale_value(v, axis=None):
    def build(d):
        x, s, z = _base(d, axis=axis)
        s = s.clone()
        s.view(-1)[-1] = v  # the last channel only: every value must be checked
        return dict(x=x, s=s, z=z, axis=axis)
    return build


def _with(**over):
    def build(d):
        axis = over.get("axis")
        # an out-of-range axis cannot size the parameters; the overrides supply them then
        x, s, z = _base(d, axis=axis if axis is not None and -3 <= axis < 3 else None)
        out = dict(x=x, s=s, z=z, axis=axis)
        for k, v in over.items():
            out[k] = v(d) if callable(v) else v
        return out
    return build


CASES = [
    _case("x_int32", TypeError, "x", _shift_x(torch.int32)),
    _case("x_float64", TypeError, "x", _shift_x(torch.float64)),
    _case("x_uint8", TypeError, "x", _shift_x(torch.uint8)),
    _case("scale_float64", TypeError, "scale", _with(s=lambda d: torch.tensor(0.1, dtype=torch.float64, device=d))),
    _case("scale_float16", TypeError, "scale", _with(s=lambda d: torch.tensor(0.1, dtype=torch.float16, device=d))),
    _case("zero_point_float64", TypeError, "zero_point", _with(z=lambda d: torch.tensor(0.0, dtype=torch.float64, device=d))),
    _case("zero_point_int32", TypeError, "zero_point", _with(z=lambda d: torch.tensor(0, dtype=torch.int32, device=d))),
    _case("scale_shape_2_per_tensor", ValueError, "scale", _with(s=lambda d: torch.full((2,), 0.1, device=d))),
    _case("scale_shape_1x1_per_tensor", ValueError, "scale", _with(s=lambda d: torch.full((1, 1), 0.1, device=d))),
    _case("scale_empty_per_tensor", ValueError, "scale", _with(s=lambda d: torch.empty(0, device=d))),
    _case("scale_len_per_channel", ValueError, "scale", _with(axis=1, s=lambda d: torch.full((6,), 0.1, device=d))),
    _case("scale_2d_per_channel", ValueError, "scale", _with(axis=1, s=lambda d: torch.full((5, 1), 0.1, device=d))),
    _case("scale_0d_per_channel", ValueError, "scale", _with(axis=1, s=lambda d: torch.tensor(0.1, device=d))),
    _case("zero_point_shape_per_tensor", ValueError, "zero_point", _with(z=lambda d: torch.zeros(2, device=d))),
    _case("zero_point_len_per_channel", ValueError, "zero_point", _with(axis=-1, z=lambda d: torch.zeros(5, device=d))),
    _case("quant_min_eq_max", ValueError, "quant_min", _with(quant_min=3, quant_max=3)),
    _case("quant_min_gt_max", ValueError, "quant_min", _with(quant_min=4, quant_max=-4)),
    _case("axis_too_large", ValueError, "axis", _with(axis=3, s=lambda d: torch.full((6,), 0.1, device=d), z=None)),
    _case("axis_too_negative", ValueError, "axis", _with(axis=-4, s=lambda d: torch.full((4,), 0.1, device=d), z=None)),
    _case("axis_on_0d_x", ValueError, "axis", _with(x=lambda d: torch.tensor(1.0, device=d), axis=0, s=lambda d: torch.full((1,), 0.1, device=d), z=None)),
]

# step sizes that are not positive and finite: CPU checks the values
BAD_SCALES = [0.0, -0.0, -0.5, float("nan"), float("inf"), -float("inf")]


def _run(op, device, build):
    kw = build(device)
    x, s, z = kw.pop("x"), kw.pop("s"), kw.pop("z")
    return lambda: _call(op, x, s, z, **kw)


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("exc,arg,build", CASES)
def test_bad_argument(plain_device, op, exc, arg, build):
    _expect(exc, arg, _run(op, plain_device, build))


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("axis", [None, 2])
@pytest.mark.parametrize("value", BAD_SCALES, ids=str)
def test_bad_scale_value_cpu(op, axis, value):
    _expect(ValueError, "scale", _run(op, "cpu", _scale_value(value, axis)))


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_raw_ops_check_too(op):
    # the checks live in C++: calling torch.ops.oqfl directly is equally guarded
    x, s, _ = _base("cpu")
    x = x.to(torch.int32)
    if op == "forward":
        fn = lambda: torch.ops.oqfl.fake_quant(x, s, None, quant_min=0, quant_max=1)  # noqa: E731
    else:
        fn = lambda: torch.ops.oqfl.fake_quant_backward(  # noqa: E731
            torch.ones(x.shape), x, s, None, quant_min=0, quant_max=1,
            output_mask=[True, True, True])
    _expect(TypeError, "x", fn)


def test_raw_op_bad_scale_value():
    x, s, _ = _base("cpu")
    _expect(ValueError, "scale",
            lambda: torch.ops.oqfl.fake_quant(x, -s, None, quant_min=0, quant_max=1))


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_bad_grad_output(plain_device, what):
    x, s, z = _base(plain_device)
    dy = torch.ones(4, 5, 7, device=plain_device) if what == "shape" else \
        torch.ones_like(x, dtype=torch.bfloat16)
    # a wrong shape is a ValueError; a wrong dtype may be reported as either kind
    exc = ValueError if what == "shape" else (TypeError, ValueError)
    _expect(exc, "grad_output", lambda: _call("backward", x, s, z, dy=dy))


def test_unknown_capability():
    ops = torch.ops.oqfl
    before = ops._cpu_capability()
    for name in ("bogus", "AVX512x", ""):
        with pytest.raises(ValueError):
            ops._set_cpu_capability(name)
        assert ops._cpu_capability() == before  # a failed switch changes nothing


# ------------------------------------------------------------------ CUDA only

@requires_cuda
@pytest.mark.parametrize("op,where", [("forward", "scale"), ("forward", "zero_point"),
                                      ("backward", "scale"), ("backward", "zero_point"),
                                      ("backward", "grad_output")])
def test_device_mismatch(op, where):
    x, s, z = _base("cuda")
    dy = torch.ones_like(x)
    if where == "scale":
        s = s.cpu()
    elif where == "zero_point":
        z = z.cpu()
    else:
        dy = dy.cpu()
    _expect(ValueError, where, lambda: _call(op, x, s, z, dy=dy))


@requires_cuda
@pytest.mark.parametrize("value", BAD_SCALES, ids=str)
def test_bad_scale_value_cuda_gives_nan(value):
    # CUDA never reads the step size on the host; elements of a bad channel come out NaN
    x, s, z = _base("cuda", axis=0)
    s[1] = value
    y = oq.fake_quant(x, s, z, quant_min=QMIN, quant_max=QMAX, axis=0)
    assert torch.isnan(y[1]).all()
    assert not torch.isnan(y[[0, 2, 3]]).any()
