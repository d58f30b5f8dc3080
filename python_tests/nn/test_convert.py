"""oqfl_ext.convert (fake-quant model -> integer inference layers) and save_packed/load_packed.

* layer level: a converted QConv2dInt / QLinearInt equals the integer reference exactly
  (F.conv2d in float64 on the dequantized integer tensors, which is exact for these sizes, then
  the op's float32 rescale), and its codes are the fake-quant layer's codes;
* model level: with integer zero points the converted model computes the fake-quant model's
  codes, so it differs only by float rounding; with the rounded LSQ+ offsets the difference of
  one layer stays inside the bound the docstring derives (one input step per element);
* the packed file: round trip, size, and a ValueError naming the path for every kind of
  corruption.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import (ConversionWarning, LSQQuantizer, QConv2dInt, QLinearInt, QuantConv2d,
                         QuantLinear, calibrate, convert, load_packed, save_packed)

from oqfl_ext.nn import integer as convert_module

from conftest import requires_cuda


# ------------------------------------------------------------------------------------------
# helpers

def _round_offsets(model: nn.Module) -> None:
    """Make every LSQ+ offset an integer (then the converted zero points are exact)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LSQQuantizer) and m.offset is not None:
                m.offset.round_()


def _nudge_offsets(model: nn.Module, frac: float = 0.3) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LSQQuantizer) and m.offset is not None:
                m.offset.add_(frac)


def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _small_model(seed: int = 0, train_steps: int = 5, **quant) -> nn.Module:
    """A SmallCNN (width 8, 16x16 inputs) quantized W4A4 (8-bit first/last layers), trained a
    few steps on random data: its LSQ+ offset is then not an integer."""
    torch.manual_seed(seed)
    model = models.create("small_cnn", in_channels=1, image_size=16, width=8)
    # the MSE step-size init these tests were sized for (quantize_model's default became LSQ's)
    model = oqfl_ext.quantize_model(model, **{"init": "mse", **quant})
    x = torch.randn(32, 1, 16, 16)
    y = torch.randint(0, 10, (32,))
    calibrate(model.train(), x)
    _train_steps(model, x, y, train_steps)
    return model


def _int_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The op's contract computed in float64 integers: u codes, exact sum of (u - zp) * w, then
    the float32 rescale float(acc) * (x_scale * w_scale) + bias, each step rounded."""
    zp = int(layer.x_zero_point.item())
    u = torch.clamp(torch.round(x.float() / layer.x_scale + zp), layer.x_quant_min,
                    layer.x_quant_max)
    w = layer.weight_codes().double()
    d = (u - zp).double()
    if isinstance(layer, QConv2dInt):
        if layer._prepad:
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            # the padding value is the real 0, i.e. the code zp, i.e. 0 in d
            d = F.pad(d, layer._reversed_padding_repeated_twice, mode=mode)
        acc = F.conv2d(d, w, None, layer.stride, layer._op_padding, layer.dilation,
                       layer.groups)
        shape = (1, -1, 1, 1)
    else:
        acc = d @ w.t()
        shape = (-1,)
    out = acc.float() * (layer.x_scale * layer.w_scale).reshape(shape)
    if layer.bias is not None:
        out = out + layer.bias.reshape(shape)
    return out


def _ready_layer(layer: nn.Module, x: torch.Tensor, offset: float = None) -> nn.Module:
    """Initialize the quantizers from x; optionally set the input offset."""
    with torch.no_grad():
        layer(x)
        if offset is not None and layer.act_quantizer.offset is not None:
            layer.act_quantizer.offset.fill_(offset)
    return layer.eval()


# ------------------------------------------------------------------------------------------
# layers: exact against the integer reference, codes equal to the fake-quant codes

CONV_CASES = [
    # weight_bits, act_bits, act_signed, kwargs
    (4, 4, False, dict(padding=1)),
    (8, 8, True, dict(padding=1, stride=2)),
    (4, 8, True, dict(padding=(1, 2), dilation=2, bias=False)),
    (8, 4, False, dict(groups=2, padding=1)),
    (3, 4, True, dict(groups=6, padding=1)),           # depthwise, 3-bit weights in int4
    (2, 2, False, dict(kernel_size=1)),
    (6, 5, True, dict(padding=1, padding_mode="reflect")),
    (4, 4, True, dict(padding="same", kernel_size=(2, 3))),   # asymmetric 'same'
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("wb,ab,signed,kw", CONV_CASES,
                         ids=[f"w{c[0]}a{c[1]}{'s' if c[2] else 'u'}-{i}"
                              for i, c in enumerate(CONV_CASES)])
def test_conv_layer_exact(device, wb, ab, signed, kw):
    kw = dict(kw)
    k = kw.pop("kernel_size", 3)
    q = QuantConv2d(6, 18, k, weight_bits=wb, act_bits=ab, act_signed=signed, **kw)
    x = torch.randn(2, 6, 9, 11)
    if not signed:
        x = x.relu()
    _ready_layer(q, x, offset=-3.0 if signed else None)   # an integer zero point
    c = QConv2dInt.from_quant(q)
    assert c.w_bits == (4 if wb <= 4 else 8) and c.weight_bits == wb
    # the codes are the fake-quant layer's: codes * scale is its quantized weight, exactly
    codes = c.weight_codes()
    assert torch.equal(codes.float() * c.w_scale.reshape(-1, 1, 1, 1),
                       q.quantized_weight().detach())
    assert int(codes.min()) >= -(1 << (wb - 1)) and int(codes.max()) < 1 << (wb - 1)
    x2 = torch.randn(3, 6, 9, 11) * 1.5   # also values beyond the calibrated range
    want = _int_reference(c, x2)
    c = c.to(device)
    got = c(x2.to(device))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    got_cl = c(x2.to(device).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got_cl.cpu(), want, rtol=0, atol=0)
    # and the fake-quant layer, up to float rounding (the same codes on both sides)
    with torch.no_grad():
        ref = q(x2)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("wb,ab,signed", [(4, 4, False), (8, 8, True), (4, 8, True),
                                          (2, 3, False)])
def test_linear_layer_exact(device, wb, ab, signed):
    q = QuantLinear(37, 21, weight_bits=wb, act_bits=ab, act_signed=signed)
    x = torch.randn(4, 5, 37)
    if not signed:
        x = x.relu()
    _ready_layer(q, x, offset=2.0 if signed else None)
    c = QLinearInt.from_quant(q)
    assert torch.equal(c.weight_codes().float() * c.w_scale[:, None],
                       q.quantized_weight().detach())
    want = _int_reference(c, x)
    got = c.to(device)(x.to(device))
    assert got.shape == (4, 5, 21)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    with torch.no_grad():
        ref = q(x)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_layer_with_fractional_offset_stays_within_one_step():
    """The documented consequence of rounding the LSQ+ offset z: each input element moves by at
    most one input step s, so output o moves by at most s * w_scale[o] * sum|codes of o| (plus
    float rounding); the integer layer still equals its own integer reference exactly."""
    q = QuantConv2d(4, 8, 3, padding=1, weight_bits=4, act_bits=4, act_signed=True)
    x = torch.randn(2, 4, 10, 10)
    _ready_layer(q, x, offset=0.4)
    c = QConv2dInt.from_quant(q)
    assert int(c.x_zero_point.item()) == 0   # round_half_even(0.4)
    got = c(x)
    torch.testing.assert_close(got, _int_reference(c, x), rtol=0, atol=0)
    with torch.no_grad():
        ref = q(x)
    bound = (c.x_scale * c.w_scale * c.weight_codes().abs().sum(dim=(1, 2, 3))).reshape(
        1, -1, 1, 1)
    diff = (got - ref).abs()
    assert bool((diff <= bound * 1.0001 + 1e-5).all()), (diff / bound).max()
    assert diff.max() > 0   # the grids do differ


def test_from_quant_rejects_unsupported_layers():
    q = QuantConv2d(3, 4, 3, weight_bits=4, act_bits=None)
    with pytest.raises(ValueError, match="float inputs"):
        QConv2dInt.from_quant(q)
    q = QuantLinear(3, 4, weight_bits=4, act_bits=4)
    with pytest.raises(ValueError, match="has not seen data"):
        QLinearInt.from_quant(q)
    with pytest.raises(TypeError, match="QuantConv2d"):
        QConv2dInt.from_quant(nn.Conv2d(3, 4, 3))


# ------------------------------------------------------------------------------------------
# models

def test_convert_matches_fake_quant_with_integer_zero_points():
    model = _small_model()
    _round_offsets(model)
    x = torch.randn(256, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
    conv = convert(model)
    assert not conv.training
    assert isinstance(conv.get_submodule("features.0.0"), QConv2dInt)
    assert isinstance(conv.get_submodule("classifier"), QLinearInt)
    # the fused graph folded the BatchNorms (test_convert_graph.py checks the graph itself)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    assert isinstance(model.features[0][0], QuantConv2d)     # the original is untouched
    with torch.no_grad():
        got = conv(x)
    # Same codes in every layer; the accumulation is exact and the rescale differs from the
    # fake-quant conv by float32 rounding only (~1e-6 relative). Such a difference can move a
    # value that sits within ~1e-6 of a rounding boundary of the next quantizer by one code,
    # which is rare: nearly all logits agree to ~1e-4 of their scale, and the predictions agree.
    scale = ref.abs().max().item()
    close = (got - ref).abs() <= 1e-4 * scale
    assert close.float().mean() >= 0.99, close.float().mean()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99


def test_convert_with_rounded_offsets_keeps_predictions():
    model = _small_model(seed=1)
    _nudge_offsets(model, 0.37)          # clearly fractional offsets
    x = torch.randn(256, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        got = convert(model)(x)
    agree = (got.argmax(1) == ref.argmax(1)).float().mean()
    assert agree >= 0.9, agree
    assert not torch.equal(got, ref)


def test_convert_inplace_and_single_layer():
    model = _small_model(train_steps=0)
    same = convert(model, inplace=True)
    assert same is model and isinstance(model.features[0][0], QConv2dInt)
    q = _ready_layer(QuantLinear(8, 4), torch.randn(3, 8))
    assert isinstance(convert(q), QLinearInt)


def test_convert_leaves_unsupported_layers_with_a_warning():
    torch.manual_seed(0)
    model = models.create("small_cnn", in_channels=1, image_size=16, width=8)
    model = oqfl_ext.quantize_model(model, overrides={
        "features.1.0": {"act_bits": None}, "classifier": {"weight_bits": None}})
    x = torch.randn(16, 1, 16, 16)
    calibrate(model, x)
    model.features[3][0].act_quantizer.enabled = False
    model.eval()
    with pytest.warns(ConversionWarning) as rec:
        conv = convert(model)
    msg = str(rec[0].message)
    assert "features.1.0" in msg and "float inputs" in msg
    assert "classifier" in msg and "float weights" in msg
    assert "features.3.0" in msg and "disabled" in msg
    assert isinstance(conv.get_submodule("features.1.0"), QuantConv2d)
    assert isinstance(conv.get_submodule("features.3.0"), QuantConv2d)
    assert isinstance(conv.get_submodule("classifier"), QuantLinear)
    assert isinstance(conv.get_submodule("features.0.0"), QConv2dInt)
    with torch.no_grad():
        assert conv(x).shape == (16, 10)


def test_convert_requires_calibrated_inputs():
    model = oqfl_ext.quantize_model(models.create("small_cnn", in_channels=1, image_size=16,
                                                  width=4))
    with pytest.raises(ValueError, match="features.0.0.*calibrate"):
        convert(model)


@pytest.fixture(scope="module")
def resnet20_w4():
    """ResNet-20 (8x8 inputs: the same parameters as for 32x32) at quantize_model's defaults
    (W4A4, first and last layers 8 bits), calibrated, integer offsets, eval mode."""
    torch.manual_seed(0)
    model = oqfl_ext.quantize_model(models.create("resnet20", image_size=8))
    calibrate(model.train(), torch.randn(8, 3, 8, 8))
    _round_offsets(model)
    return model.eval()


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet20", dict(image_size=8), (8, 3, 8, 8)),
    ("vgg", dict(width=8, hidden=32, image_size=8), (8, 3, 8, 8)),
    ("mobilenet_v2", dict(last_channels=32, image_size=8), (4, 3, 8, 8)),
])
def test_zoo_models_convert_and_round_trip(tmp_path, request, name, kwargs, shape):
    x = torch.randn(shape)
    if name == "resnet20":
        model = request.getfixturevalue("resnet20_w4")
    else:
        torch.manual_seed(0)
        model = oqfl_ext.quantize_model(models.create(name, **kwargs))
        calibrate(model.train(), x)
        _round_offsets(model)
        model.eval()
    conv = convert(model)
    n_int = sum(isinstance(m, (QConv2dInt, QLinearInt)) for m in conv.modules())
    n_layers = sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())
    assert n_int == n_layers
    with torch.no_grad():
        ref, got = model(x), conv(x)
    scale = ref.abs().max().item()
    assert ((got - ref).abs() <= 1e-3 * scale).float().mean() >= 0.95
    path = tmp_path / f"{name}.safetensors"
    save_packed(conv, path)
    loaded = load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


# ------------------------------------------------------------------------------------------
# the packed file

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(converted model, its input, output, path of its packed file). Converted layer by
    layer, so that the file also holds BatchNorm entries (test_convert_graph.py saves fused
    graphs)."""
    model = _small_model(seed=3)
    conv = convert(model, fuse=False)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        y = conv(x)
    path = tmp_path_factory.mktemp("packed") / "model.safetensors"
    save_packed(conv, path)
    return conv, x, y, str(path)


def test_round_trip_identical(saved):
    conv, x, y, path = saved
    loaded = load_packed(path)
    assert not loaded.training
    assert [type(m) for m in loaded.modules()] == [type(m) for m in conv.modules()]
    sa, sb = conv.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_save_converts_a_fake_quant_model(tmp_path):
    model = _small_model(seed=4)
    path = tmp_path / "m.safetensors"
    save_packed(model, path)                       # converted on the way, model untouched
    assert isinstance(model.features[0][0], QuantConv2d)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), convert(model)(x))


def test_round_trip_with_fake_quant_layers(tmp_path):
    torch.manual_seed(0)
    model = oqfl_ext.quantize_model(
        models.create("small_cnn", in_channels=1, image_size=16, width=8),
        overrides={"features.1.0": {"act_bits": None}})
    x = torch.randn(8, 1, 16, 16)
    calibrate(model, x)
    model.classifier.weight_quantizer.enabled = False
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        conv = convert(model)
    path = tmp_path / "m.safetensors"
    save_packed(conv, path)
    loaded = load_packed(path)
    assert isinstance(loaded.get_submodule("features.1.0"), QuantConv2d)
    assert loaded.classifier.weight_quantizer.enabled is False
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x))


def _header(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def test_file_layout_and_size(saved):
    conv, _, _, path = saved
    data = open(path, "rb").read()
    n, header = _header(data)
    meta = header.pop("__metadata__")
    assert meta["format"] == "oqfl_ext.packed_model" and meta["version"] == "2"
    arch = json.loads(meta["architecture"])
    assert arch["model"] == "small_cnn"
    assert arch["kwargs"] == dict(in_channels=1, num_classes=10, image_size=16, width=8)
    # the codes blob holds the compact codes: ceil(numel * bits / 8) bytes per layer
    want = 0
    for m in conv.modules():
        if isinstance(m, (QConv2dInt, QLinearInt)):
            want += math.ceil(m.weight_codes().numel() * m.w_bits / 8)
    assert header["codes"]["shape"] == [want]
    assert header["codes"]["dtype"] == "U8"
    # nothing else is big: the rest of the file is the scales, biases and BatchNorm tensors
    other = sum(t.numel() * t.element_size() for k, t in conv.state_dict().items()
                if not k.endswith("w_packed"))
    assert len(data) == 8 + n + want + other


def test_resnet20_w4_file_is_a_seventh_of_float32(tmp_path, resnet20_w4):
    from safetensors.torch import save_file
    float_model = models.create("resnet20")
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()},
              str(tmp_path / "float.safetensors"))
    save_packed(resnet20_w4, tmp_path / "w4.safetensors")   # converted on the way
    f32 = os.path.getsize(tmp_path / "float.safetensors")
    w4 = os.path.getsize(tmp_path / "w4.safetensors")
    assert w4 * 7 <= f32, (w4, f32)


def _rewrite(data: bytes, path, mutate_meta=None, mutate_tensors=None, resign=True):
    """Write a modified copy of a packed file: metadata and/or tensors changed, digest
    recomputed (so that the loader's later checks are reached)."""
    from safetensors.torch import load, save
    _, header = _header(data)
    meta = dict(header["__metadata__"])
    blobs = load(data)
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(blobs)
    if resign:
        meta["digest"] = convert_module._digest(meta, blobs)
    with open(path, "wb") as f:
        f.write(save(blobs, metadata=meta))
    return path


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)


def test_corrupt_bytes(saved, tmp_path):
    *_, path = saved
    data = open(path, "rb").read()
    n, header = _header(data)
    text = data[8:8 + n]
    cases = {
        "size": _flip(data, 2),
        "header-json": _flip(data, 8 + 1),
        "header-entry": _flip(data, 8 + text.index(b"data_offsets") + 16),
        "header-metadata": _flip(data, 8 + text.index(b"architecture") + 40),
        "digest": _flip(data, 8 + text.index(b"sha256:") + 10),
        "data-start": _flip(data, 8 + n),
        "data-middle": _flip(data, 8 + n + (len(data) - 8 - n) // 2),
        "data-end": _flip(data, len(data) - 1),
    }
    for name, bad in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(bad)
        with pytest.raises(ValueError, match=str(p).replace("\\", "\\\\")) as e:
            load_packed(p)
        assert "Traceback" not in str(e.value), name


def test_truncated_and_extended(saved, tmp_path):
    *_, path = saved
    data = open(path, "rb").read()
    n, _ = _header(data)
    for cut in (0, 4, 8, 8 + n // 2, 8 + n, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt or truncated|digest"):
            load_packed(p)
    p = tmp_path / "long.safetensors"
    p.write_bytes(data + b"\0" * 16)
    with pytest.raises(ValueError):
        load_packed(p)


def test_wrong_metadata(saved, tmp_path):
    *_, path = saved
    data = open(path, "rb").read()

    def arch_edit(fn):
        def mutate(meta):
            arch = json.loads(meta["architecture"])
            fn(arch)
            meta["architecture"] = json.dumps(arch)
        return mutate

    def set_layer(key, value):
        return arch_edit(lambda a: a["layers"]["features.1.0"].__setitem__(key, value))

    cases = [
        (dict(mutate_meta=lambda m: m.__setitem__("format", "something.else")), "format"),
        (dict(mutate_meta=lambda m: m.__setitem__("version", "3")), "version"),
        (dict(mutate_meta=lambda m: m.__setitem__("version", "1")),
         "version 1 predates the fused integer graph"),
        (dict(mutate_meta=lambda m: m.pop("architecture")), "metadata keys"),
        (dict(mutate_meta=lambda m: m.__setitem__("architecture", "{not json")), "JSON"),
        (dict(mutate_meta=lambda m: m.__setitem__("format", "x"), resign=False), "format"),
        (dict(mutate_meta=lambda m: m.__setitem__("extra", "1"), resign=False), "metadata"),
        (dict(mutate_meta=lambda m: m.__setitem__("digest", "sha256:00"), resign=False),
         "digest"),
        (dict(mutate_meta=arch_edit(lambda a: a.__setitem__("model", "resnet50"))),
         "resnet50"),
        (dict(mutate_meta=arch_edit(lambda a: a["kwargs"].__setitem__("width", 16))),
         "needs"),
        # a huge model is neither built nor allocated: its arguments are out of range
        (dict(mutate_meta=arch_edit(lambda a: a["kwargs"].__setitem__("width", 8192))),
         r"width expected an integer in \[1, 1024\]"),
        (dict(mutate_meta=arch_edit(lambda a: a["kwargs"].__setitem__("width", 1024))),
         "needs"),
        (dict(mutate_meta=arch_edit(lambda a: a["kwargs"].__setitem__("depth", 3))),
         "create"),
        (dict(mutate_meta=arch_edit(lambda a: a["kwargs"].__setitem__("width", "8"))),
         "width expected an integer"),
        (dict(mutate_meta=set_layer("weight_bits", 8)), "code_bits 4 is not weight_bits"),
        (dict(mutate_meta=arch_edit(lambda a: a["layers"]["features.1.0"].update(
            weight_bits=8, code_bits=8))), "needs"),
        (dict(mutate_meta=set_layer("fusion", {"relu": True})), "fusion expected keys"),
        (dict(mutate_meta=arch_edit(lambda a: a["layers"]["features.1.0"]["fusion"].update(
            relu=True))), "fused layers in a file without a graph"),
        (dict(mutate_meta=arch_edit(lambda a: (a.__setitem__("graph", True), a["layers"][
            "features.0.0"]["fusion"].__setitem__("bn", "features.0.1")))),
         "fused graph does not match the file's: layer 'features.0.0'.*'relu'"),
        (dict(mutate_meta=arch_edit(lambda a: a["state"].pop(3))), "missing from the file"),
        (dict(mutate_meta=arch_edit(lambda a: a["state"][3].__setitem__(2, [7]))),
         "in the file, the model needs"),
        (dict(mutate_meta=set_layer("weight_bits", 9)), "bit width"),
        (dict(mutate_meta=set_layer("kind", "magic")), "kind"),
        (dict(mutate_meta=set_layer("act_signed", "yes")), "act_signed"),
        (dict(mutate_meta=arch_edit(lambda a: a["layers"].__setitem__("features.9", {}))),
         "features.9"),
    ]
    for i, (kw, match) in enumerate(cases):
        p = _rewrite(data, tmp_path / f"meta{i}.safetensors", **kw)
        with pytest.raises(ValueError, match=match) as e:
            load_packed(p)
        assert str(p) in str(e.value), (i, e.value)


def test_wrong_tensors(saved, tmp_path):
    *_, path = saved
    data = open(path, "rb").read()

    def edit(fn):
        def mutate(blobs):
            fn(blobs)
        return mutate

    def zero_scale(b):
        b["state.float32"].zero_()

    def bad_zero_point(b):
        b["state.int32"].fill_(300)

    def bad_codes(b):  # 0x88 is the int4 pair (-8, -8); an 8-bit first layer gets -120
        b["codes"].fill_(0x88)

    cases = [
        (edit(lambda b: b.pop("state.int64")), "holds tensors"),
        (edit(lambda b: b.__setitem__("extra", torch.zeros(3))), "holds tensors"),
        (edit(lambda b: b.__setitem__("codes", b["codes"][:-1].clone())), "codes"),
        (edit(lambda b: b.__setitem__("state.float32", b["state.float32"].double())),
         "float32"),
        (edit(lambda b: b.__setitem__("codes", b["codes"].reshape(1, -1).clone())), "codes"),
        (edit(zero_scale), "positive and finite"),
        (edit(bad_zero_point), "zero point"),
    ]
    for i, (mutate, match) in enumerate(cases):
        p = _rewrite(data, tmp_path / f"t{i}.safetensors", mutate_tensors=mutate)
        with pytest.raises(ValueError, match=match):
            load_packed(p)
    # codes outside a 2-bit layer's range (stored in an int4 container) are rejected
    model = _small_model(seed=5, train_steps=0, weight_bits=2)
    p2 = tmp_path / "w2.safetensors"
    save_packed(model, p2)
    p = _rewrite(p2.read_bytes(), tmp_path / "w2bad.safetensors",
                 mutate_tensors=edit(bad_codes))
    with pytest.raises(ValueError, match="weight codes outside the 2-bit range"):
        load_packed(p)


def _forge_file(path, arch, blobs):
    """A packed file with the given architecture and tensors and a valid digest."""
    from safetensors.torch import save
    meta = {"format": "oqfl_ext.packed_model", "version": "2",
            "architecture": json.dumps(arch)}
    meta["digest"] = convert_module._digest(meta, blobs)
    path.write_bytes(save(blobs, metadata=meta))
    return path


def _no_build(monkeypatch):
    def create(*args, **kwargs):
        pytest.fail(f"the loader built models.create{args}{kwargs} before checking the file")
    monkeypatch.setattr(models, "create", create)


@pytest.mark.parametrize("kwargs,match", [
    # a ~400-byte file naming 3 x 65536 residual blocks: refused from its description
    (dict(blocks_per_stage=65536), r"blocks_per_stage expected an integer in \[1, 64\]"),
    (dict(blocks_per_stage=1 << 40), "blocks_per_stage"),
    (dict(num_classes=10 ** 7), r"num_classes expected an integer in \[2, 100000\]"),
    (dict(image_size=1 << 20), "image_size"),
    (dict(blocks_per_stage=3.0), "blocks_per_stage"),
    (dict(depth=20), "'depth' is not an argument of oqfl_ext.models.create"),
    # within the ranges, but far more weights than the file's bytes can hold
    (dict(blocks_per_stage=64), r"needs at least \d+ bytes of tensors, the file holds 40"),
    (dict(blocks_per_stage=3), r"needs at least \d+ bytes of tensors, the file holds 40"),
])
def test_forged_architecture_is_refused_before_anything_is_built(tmp_path, monkeypatch,
                                                                 kwargs, match):
    arch = {"model": "resnet20", "layers": {}, "graph": False, "state": [],
            "kwargs": dict(dict(in_channels=3, num_classes=10, image_size=32), **kwargs)}
    blobs = {"state.float32": torch.zeros(8), "state.int64": torch.zeros(1, dtype=torch.int64)}
    path = _forge_file(tmp_path / "forged.safetensors", arch, blobs)
    assert os.path.getsize(path) < 1024
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match=match) as e:
        load_packed(path)
    assert str(path) in str(e.value)


def test_save_refuses_architectures_outside_the_ranges(tmp_path):
    model = models.create("small_cnn", in_channels=1, image_size=8, width=2, num_classes=2)
    model.num_classes = 10 ** 6   # what the description would record
    with pytest.raises(ValueError, match="save_packed.*num_classes expected an integer"):
        save_packed(model, tmp_path / "x.safetensors")
    assert not os.path.exists(tmp_path / "x.safetensors")


def _float32_span(model, key):
    """(offset, numel) of state entry ``key`` in the file's ``state.float32`` blob: the
    float32 entries of the state_dict, concatenated in order (the documented layout)."""
    offset = 0
    for k, t in model.state_dict().items():
        if k == key:
            assert t.dtype == torch.float32
            return offset, t.numel()
        if t.dtype == torch.float32:
            offset += t.numel()
    raise KeyError(key)


NON_FINITE_CASES = [
    ("features.0.1.running_mean", float("nan"), "non-finite"),
    ("features.1.1.running_var", float("inf"), "non-finite"),
    ("features.3.1.running_var", -0.5, "negative"),
    ("features.0.1.weight", float("-inf"), "non-finite"),
    ("features.1.1.bias", float("nan"), "non-finite"),
    ("classifier.bias", float("nan"), "non-finite"),
]


@pytest.mark.parametrize("key,value,match", NON_FINITE_CASES)
def test_load_refuses_non_finite_and_negative_variance_entries(saved, tmp_path, key, value,
                                                               match):
    # a NaN BatchNorm statistic makes the model answer one constant class for every input
    conv, *_, path = saved
    offset, numel = _float32_span(conv, key)

    def poison(blobs):
        blobs["state.float32"][offset + numel - 1] = value

    p = _rewrite(open(path, "rb").read(), tmp_path / "bad.safetensors", mutate_tensors=poison)
    with pytest.raises(ValueError, match=f"{key}.*{match}") as e:
        load_packed(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("key,value,match", NON_FINITE_CASES)
@pytest.mark.parametrize("kind", ["converted", "fake_quant", "float"])
def test_save_refuses_non_finite_and_negative_variance_entries(saved, tmp_path, key, value,
                                                               match, kind):
    import copy
    if kind == "converted":
        model = copy.deepcopy(saved[0])
    elif kind == "fake_quant":
        model = _small_model(seed=8, train_steps=0)
    else:
        torch.manual_seed(0)
        model = models.create("small_cnn", in_channels=1, image_size=16, width=8).eval()
    with torch.no_grad():
        model.state_dict()[key].view(-1)[-1] = value
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=f"save_packed.*{key}.*{match}"):
        save_packed(model, path)
    assert not path.exists()


def test_save_refuses_a_non_finite_fake_quant_weight(tmp_path):
    model = _small_model(seed=9, train_steps=0)
    with torch.no_grad():
        model.features[1][0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="save_packed.*features.1.0.weight.*non-finite"):
        save_packed(model, tmp_path / "m.safetensors")


def test_not_a_packed_file(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(ValueError, match="no string metadata|format"):
        load_packed(p)
    p.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_packed(p)
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing.safetensors")


def test_models_outside_the_zoo_load_into_the_callers_structure(tmp_path):
    """Since the fused graph (format version 2) any model can be saved; one that its zoo
    constructor does not describe is loaded into the structure the caller builds."""
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()

    class MyCNN(models.SmallCNN):
        pass

    changed = _small_model(seed=6, train_steps=0)
    changed.features[1][2] = nn.Tanh()            # not what small_cnn builds
    strided = models.create("small_cnn", in_channels=1, image_size=16, width=4).eval()
    strided.features[0][0].stride = (2, 2)
    x = torch.randn(2, 1, 16, 16)
    for i, model in enumerate([seq, MyCNN(in_channels=1, image_size=16).eval(), changed,
                               strided]):
        p = tmp_path / f"m{i}.safetensors"
        save_packed(model, p)
        with pytest.raises(ValueError, match=r"no oqfl_ext.models architecture.*model=") as e:
            load_packed(p)
        assert str(p) in str(e.value)
        loaded = load_packed(p, model=model)
        want = convert(model) if model is changed else model
        sa, sb = want.state_dict(), loaded.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        if model is not strided:    # (a broken model: its classifier no longer fits)
            with torch.no_grad():
                assert torch.equal(loaded(x), want(x))


def test_float_zoo_model_round_trip(tmp_path):
    model = models.create("small_cnn", in_channels=1, image_size=16, width=4).eval()
    save_packed(model, tmp_path / "f.safetensors")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "f.safetensors")(x), model(x))


@requires_cuda
def test_cuda_converted_model_matches_cpu(saved):
    conv, x, y, path = saved
    loaded = load_packed(path, map_location="cuda")
    with torch.no_grad():
        got = loaded(x.cuda()).cpu()
    # the same integers; the rescale may round differently by an ulp on the GPU
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
