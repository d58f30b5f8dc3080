"""Limits of the ops: sizes derived from huge arguments (int64 overflow), the int32 accumulation
bound of qconv2d/qlinear, element counts of the packing ops, and tensors on mismatched devices.

Each refusal is checked on the CPU kernel and on the fake (meta) kernel, which must refuse the
same way. Calls that crashed the process before the fix run in a subprocess, so a segfault
fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import reference as ref
from oqfl_ext import ops as oq

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# K * 255 * max|w| <= INT32_MAX (qconv_max_reduction in csrc/qconv_args.cpp)
MAX_K = {8: INT32_MAX // (255 * 128), 4: INT32_MAX // (255 * 8)}


def _names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def _run_isolated(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter; it must print one JSON line. A crash (segfault,
    abort) fails the calling test with the signal instead of killing pytest."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, (
        f"subprocess died with return code {proc.returncode}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ qconv2d: int64 size overflow

_CONV_SETUP = """
import json, torch
from oqfl_ext import ops
torch.manual_seed(0)
x = torch.rand(1, 4, 6, 6)
wp = ops.pack_conv_weight(torch.randint(-128, 128, (16, 4, 3, 3), dtype=torch.int8), 8)
def call(x, **kw):
    return ops.qconv2d(x, torch.tensor(.01, device=x.device), torch.tensor(0, device=x.device),
                       wp.to(x.device), torch.full((16,), .02, device=x.device), w_bits=8, **kw)
"""

# (id, keyword arguments, the argument the error must name)
OVERFLOW_CASES = [
    ("padding_and_stride", dict(padding=(2**61, 0), stride=(2**62, 1)), "padding"),
    ("dilation_max", dict(dilation=(INT64_MAX, 1)), "dilation"),
    ("dilation_wraps_positive", dict(dilation=(1, 2**62 + 1)), "dilation"),
    ("padding_max", dict(padding=(INT64_MAX, 0)), "padding"),
    ("padding_sum_wraps", dict(padding=(0, 2**62 - 2)), "padding"),
]


@pytest.mark.parametrize("kwargs,arg", [pytest.param(k, a, id=i) for i, k, a in OVERFLOW_CASES])
def test_qconv2d_overflowing_geometry_is_refused(kwargs, arg):
    result = _run_isolated(_CONV_SETUP + f"""
kw = {kwargs!r}
out = {{}}
for device in ("cpu", "meta"):
    try:
        y = call(x.to(device), **kw)
        out[device] = ["returned", list(y.shape)]
    except ValueError as e:
        out[device] = ["ValueError", str(e)]
print(json.dumps(out))
""")
    for device in ("cpu", "meta"):
        kind, msg = result[device]
        assert kind == "ValueError", f"{device}: {kind} {msg}"
        assert _names(msg, arg) and "int64" in msg, f"{device}: {msg}"
    assert result["cpu"][1] == result["meta"][1]  # one check, one message


def test_qconv2d_huge_stride_is_exact():
    """Huge but meaningful arguments are not over-refused: a stride beyond the input gives the
    first window only, checked against the reference on the cropped input."""
    kwargs = dict(stride=(2**62, INT64_MAX))
    torch.manual_seed(1)
    x = torch.rand(2, 4, 6, 6)
    codes = torch.randint(-128, 128, (16, 4, 3, 3), dtype=torch.int8)
    wp = oq.pack_conv_weight(codes, 8)
    xs, zp, ws = torch.tensor(.01), torch.tensor(3), torch.rand(16) * .05 + .01
    got = oq.qconv2d(x, xs, zp, wp, ws, w_bits=8, **kwargs)
    want = ref.qconv2d_ref(x[:, :, :3, :3].contiguous(), xs, zp, wp, ws, w_bits=8)
    assert got.shape == (2, 16, 1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    meta = oq.qconv2d(x.to("meta"), xs.to("meta"), zp.to("meta"), wp.to("meta"),
                      ws.to("meta"), w_bits=8, **kwargs)
    assert meta.shape == got.shape


def test_qconv2d_huge_dilation_of_unit_kernel_is_exact():
    """A dilation never applied (kernel size 1 along that axis) may be as large as int64 allows."""
    x = torch.rand(1, 8, 5, 7)
    codes = torch.randint(-128, 128, (16, 8, 1, 3), dtype=torch.int8)
    wp = oq.pack_conv_weight(codes, 8)
    xs, zp, ws = torch.tensor(.02), torch.tensor(0), torch.full((16,), .03)
    got = oq.qconv2d(x, xs, zp, wp, ws, w_bits=8, dilation=(INT64_MAX, 2))
    want = ref.qconv2d_ref(x, xs, zp, wp, ws, w_bits=8, dilation=(1, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------ int32 accumulation bound

def _linear_extreme(k: int, w_bits: int, signed: bool):
    """The largest |sum (u - zp) * w| a shape allows: u - zp = +-255, w = -128 (8 bits) or -8."""
    if signed:
        x = torch.full((2, k), 127, dtype=torch.int8)
        zp = torch.tensor(-128)
    else:
        x = torch.full((2, k), 255, dtype=torch.uint8)
        zp = torch.tensor(0)
    wmin = -128 if w_bits == 8 else -8
    codes = torch.full((16, k), wmin, dtype=torch.int8)
    codes[1] = -codes[1] - 1  # channel 1: the largest positive code (127 or 7)
    wp = oq.pack_linear_weight(codes, w_bits)
    return x, torch.tensor(1.0), zp, wp, torch.ones(16)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_qlinear_accumulation_at_the_bound_is_exact(w_bits, signed):
    k = MAX_K[w_bits]
    x, xs, zp, wp, ws = _linear_extreme(k, w_bits, signed)
    got = oq.qlinear(x, xs, zp, wp, ws, w_bits=w_bits)
    want = ref.qlinear_ref(x, xs, zp, wp, ws, w_bits=w_bits)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the worst case really is that close to int32's range
    wmax = 128 if w_bits == 8 else 8
    assert abs(float(want[0, 0])) == pytest.approx(255 * wmax * k, rel=1e-6)
    assert 255 * wmax * (k + 1) > INT32_MAX


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_qlinear_accumulation_past_the_bound_is_refused(w_bits, device):
    # k + 1 past the bound, and the K = 131072 (which wrapped to +1.678e7 for 8 bits)
    for k in {MAX_K[w_bits] + 1, 131072 if w_bits == 8 else 2**21}:
        x, xs, zp, wp, ws = (t.to(device) for t in _linear_extreme(k, w_bits, False))
        with pytest.raises(ValueError) as info:
            oq.qlinear(x, xs, zp, wp, ws, w_bits=w_bits)
        msg = str(info.value)
        assert _names(msg, "x") and f"at most {MAX_K[w_bits]}" in msg and f"K = {k}" in msg, msg


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_qconv2d_accumulation_bound_counts_taps_and_groups(device):
    """K = C / groups * KH * KW: 7312 channels x 3x3 taps = 65808 > 65793 is refused, the same
    channels in two groups (K = 32904) are not."""
    c = 7312
    x = torch.zeros(1, c, 3, 3, dtype=torch.uint8, device=device)
    xs, zp = torch.tensor(1.0, device=device), torch.tensor(0, device=device)
    ws = torch.ones(16, device=device)
    for groups, refused in ((1, True), (2, False)):
        shape = oq.conv_weight_layout_shape(16, c // groups, (3, 3), 8, groups)
        wp = torch.zeros(shape, dtype=torch.int8, device=device)
        if refused:
            with pytest.raises(ValueError) as info:
                oq.qconv2d(x, xs, zp, wp, ws, w_bits=8, groups=groups)
            msg = str(info.value)
            assert _names(msg, "x") and "K = 65808" in msg and "KH = 3" in msg, msg
        else:
            y = oq.qconv2d(x, xs, zp, wp, ws, w_bits=8, groups=groups)
            assert y.shape == (1, 16, 1, 1)
            if device == "cpu":
                assert torch.equal(y, torch.zeros_like(y))


# ------------------------------------------------------------ packing: element counts

@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_unpack_numel_whose_byte_count_wraps_is_refused(device):
    # 2**62 codes of 8 bits: numel * bits + 7 wraps to 7, i.e. 0 bytes, before the fix
    packed = torch.zeros(0, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"unpack: numel expected at most"):
        oq.unpack(packed, 8, 2**62)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_unpack_dequantize_shape_product_overflow_is_refused(device):
    packed = torch.zeros(0, dtype=torch.uint8, device=device)
    s = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError) as info:
        oq.unpack_dequantize(packed, s, bits=8, shape=[2**32, 2**32])
    msg = str(info.value)
    assert _names(msg, "shape") and "int64" in msg, msg


# ------------------------------------------------------------ devices

def _fake_quant(x, s, z):
    return oq.fake_quant(x, s, z, quant_min=-8, quant_max=7)


def _fake_quant_backward(x, s, z):
    return oq.fake_quant_backward(torch.ones_like(x), x, s, z, quant_min=-8, quant_max=7)


def _quantize_pack(x, s, z):
    return oq.quantize_pack(x, s, z, bits=4)


def _unpack_dequantize(x, s, z):
    packed = torch.zeros(10, dtype=torch.uint8, device=x.device)
    return oq.unpack_dequantize(packed, s, z, bits=4, shape=[4, 5])


STEP_OPS = {"fake_quant": _fake_quant, "fake_quant_backward": _fake_quant_backward,
            "quantize_pack": _quantize_pack, "unpack_dequantize": _unpack_dequantize}


@pytest.mark.parametrize("moved", ["scale", "zero_point"])
@pytest.mark.parametrize("x_device,step_device", [("cpu", "meta"), ("meta", "cpu")])
@pytest.mark.parametrize("op", sorted(STEP_OPS))
def test_step_tensors_on_another_device_are_refused(op, moved, x_device, step_device):
    """A meta scale or zero point next to a CPU x dispatches to the fake kernel, which returned
    uninitialised memory; every kernel requires the step tensors on the data's device."""
    x = torch.randn(4, 5, device=x_device)
    s = torch.tensor(0.1, device=step_device if moved == "scale" else x_device)
    z = torch.tensor(0.0, device=step_device if moved == "zero_point" else x_device)
    with pytest.raises(ValueError) as info:
        STEP_OPS[op](x, s, z)
    msg = str(info.value)
    data = "packed" if op == "unpack_dequantize" else "x"
    assert _names(msg, moved) and f"on the device of {data} ({x_device})" in msg, msg
    assert msg.endswith(f"got {step_device}"), msg


@pytest.mark.parametrize("x_device,g_device", [("cpu", "meta"), ("meta", "cpu")])
def test_fake_quant_backward_grad_output_on_another_device_is_refused(x_device, g_device):
    x = torch.randn(4, 5, device=x_device)
    s = torch.tensor(0.1, device=x_device)
    dy = torch.ones(4, 5, device=g_device)
    with pytest.raises(ValueError) as info:
        oq.fake_quant_backward(dy, x, s, quant_min=-8, quant_max=7)
    assert _names(str(info.value), "grad_output"), str(info.value)


@pytest.mark.parametrize("moved", ["x_scale", "x_zero_point", "w_packed", "w_scale", "bias",
                                   "residual", "out_scale", "out_zero_point"])
@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
def test_qconv_tensors_on_another_device_are_refused(op, moved):
    args = dict(x_scale=torch.tensor(.01), x_zero_point=torch.tensor(0),
                w_scale=torch.full((16,), .02), bias=torch.zeros(16),
                out_scale=torch.tensor(.05), out_zero_point=torch.tensor(3))
    if op == "qconv2d":
        x = torch.rand(1, 4, 6, 6)
        args["w_packed"] = oq.pack_conv_weight(torch.zeros(16, 4, 3, 3, dtype=torch.int8), 8)
        args["residual"] = torch.zeros(1, 16, 4, 4)
    else:
        x = torch.rand(3, 4)
        args["w_packed"] = oq.pack_linear_weight(torch.zeros(16, 4, dtype=torch.int8), 8)
        args["residual"] = torch.zeros(3, 16)
    args[moved] = args[moved].to("meta")
    fn = getattr(oq, op)
    with pytest.raises(ValueError) as info:
        fn(x, args["x_scale"], args["x_zero_point"], args["w_packed"], args["w_scale"],
           args["bias"], w_bits=8, residual=args["residual"], out_scale=args["out_scale"],
           out_zero_point=args["out_zero_point"])
    msg = str(info.value)
    assert _names(msg, moved) and "on the device of x (cpu)" in msg, msg
