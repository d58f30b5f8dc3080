"""quantize_model on the zoo and on torchvision's resnet18 / mobilenet_v2: every Conv2d and
Linear replaced, weights kept, first/last and per-layer bit widths, the summary, and a
training step that moves every step size."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import (LSQQuantizer, QuantConv2d, QuantLinear, calibrate, quantization_summary,
                         set_quantizers_enabled)

try:
    import torchvision
    _TV_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    torchvision = None
    _TV_ERROR = f"torchvision is not usable: {type(e).__name__}: {e}"

requires_torchvision = pytest.mark.skipif(torchvision is None, reason=str(_TV_ERROR))


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _check_quantized(float_model, qmodel, first_last_bits=8, weight_bits=4, act_bits=4):
    before, after = _layers(float_model), _layers(qmodel)
    assert [n for n, _ in before] == [n for n, _ in after]
    assert len(after) >= 3
    for i, ((name, f), (_, q)) in enumerate(zip(before, after)):
        assert type(q) is {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}[type(f)], name
        assert torch.equal(q.weight, f.weight), name
        assert q.weight.data_ptr() != f.weight.data_ptr()
        if f.bias is not None:
            assert torch.equal(q.bias, f.bias), name
        edge = i in (0, len(after) - 1) and first_last_bits is not None
        assert q.weight_bits == (first_last_bits if edge else weight_bits), name
        assert q.act_bits == (first_last_bits if edge else act_bits), name
        if isinstance(f, nn.Conv2d):
            for attr in ("stride", "padding", "dilation", "groups"):
                assert getattr(q, attr) == getattr(f, attr)
    # the float model is untouched (inplace=False)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in float_model.modules())


def _train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    steps = {n: p.grad for n, p in model.named_parameters() if n.endswith("step_size")}
    opt.step()
    assert torch.isfinite(loss)
    for n, g in steps.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    return loss


@pytest.mark.parametrize("name,channels,size", [("small_cnn", 1, 28), ("vgg", 3, 32),
                                                ("resnet20", 3, 32), ("mobilenet_v2", 1, 28)])
def test_quantize_zoo(name, channels, size):
    model = models.create(name, in_channels=channels, image_size=size)
    q = oqfl_ext.quantize_model(model)
    _check_quantized(model, q)
    x = torch.randn(4, channels, size, size)
    _train_step(q, x, torch.randint(0, 10, (4,)))
    # inputs after a ReLU were found non-negative, the image is signed
    first = _layers(q)[0][1]
    assert first.act_quantizer.is_signed is True
    assert any(m.act_quantizer.is_signed is False for _, m in _layers(q)[1:])


@requires_torchvision
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_quantize_torchvision(arch):
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    q = oqfl_ext.quantize_model(model, weight_bits=4, act_bits=4, first_last_bits=8)
    _check_quantized(model, q)
    x = torch.randn(2, 3, 32, 32)
    _train_step(q, x, torch.tensor([1, 7]))
    q.eval()
    with torch.no_grad():
        model.eval()
        ref = model(x)
        out = q(x)
    assert out.shape == ref.shape == (2, 10)


def test_first_last_and_overrides():
    model = models.ResNet20()
    q = oqfl_ext.quantize_model(model, weight_bits=3, act_bits=5, first_last_bits=None,
                                overrides={"layer2.0.conv1": None, "layer3.2.conv2": 8,
                                           "fc": {"act_bits": None, "weight_bits": 6},
                                           "layer1.0.conv1": {"act_signed": True}})
    layers = dict(_layers(q))
    assert type(layers["layer2.0.conv1"]) is nn.Conv2d  # kept in float
    assert (layers["layer3.2.conv2"].weight_bits, layers["layer3.2.conv2"].act_bits) == (8, 8)
    assert (layers["fc"].weight_bits, layers["fc"].act_bits) == (6, None)
    assert layers["fc"].act_quantizer is None
    assert layers["layer1.0.conv1"].act_quantizer.is_signed is True
    assert (layers["conv1"].weight_bits, layers["conv1"].act_bits) == (3, 5)
    assert (layers["layer2.1.conv1"].weight_bits, layers["layer2.1.conv1"].act_bits) == (3, 5)


def test_float_first_and_last_layers():
    model = models.ResNet20()
    q = oqfl_ext.quantize_model(model, first_last_bits="float",
                                overrides={"fc": {"act_bits": 6}})
    layers = dict(_layers(q))
    first, last = oqfl_ext.nn.edge_layers(model)
    assert (first, last) == ("conv1", "fc")
    assert type(layers["conv1"]) is nn.Conv2d                 # kept in float
    assert (layers["fc"].weight_bits, layers["fc"].act_bits) == (4, 6)  # override on the base
    assert (layers["layer2.1.conv1"].weight_bits, layers["layer2.1.conv1"].act_bits) == (4, 4)
    for bad in ("fp32", "8"):
        with pytest.raises(ValueError, match="first_last_bits expected"):
            oqfl_ext.quantize_model(model, first_last_bits=bad)


def test_act_grad_count_reaches_the_input_quantizers_only():
    net = models.create("vgg", in_channels=1, num_classes=10, image_size=8, width=4)
    for count in ("example", "all"):
        q = oqfl_ext.quantize_model(net, act_grad_count=count)
        layers = [m for _, m in _layers(q)]
        assert {m.act_quantizer.grad_count for m in layers} == {count}
        assert {m.weight_quantizer.grad_count for m in layers} == {"all"}
    with pytest.raises(ValueError, match="act_grad_count expected"):
        oqfl_ext.quantize_model(net, act_grad_count="batch")


def test_the_defaults_come_from_quant_defaults():
    from oqfl_ext.nn import QUANT_DEFAULTS
    net = models.create("vgg", in_channels=1, num_classes=10, image_size=8, width=4)
    layers = [m for _, m in _layers(oqfl_ext.quantize_model(net))]
    first, last = layers[0], layers[-1]
    edge = QUANT_DEFAULTS["first_last_bits"]
    if edge == "float":
        assert type(first) is nn.Conv2d and type(last) is nn.Linear
    else:
        assert (first.weight_bits, last.act_bits) == (edge, edge)
    quantizers = [m for m in layers if isinstance(m, (QuantConv2d, QuantLinear))]
    assert {m.act_quantizer.grad_count for m in quantizers} == {QUANT_DEFAULTS["act_grad_count"]}
    assert {m.weight_quantizer.init for m in quantizers} == {QUANT_DEFAULTS["init"]}
    # a quantized layer built directly gets the same input-quantizer count
    assert QuantConv2d(1, 2, 3).act_quantizer.grad_count == QUANT_DEFAULTS["act_grad_count"]


def test_inplace():
    model = models.SmallCNN()
    q = oqfl_ext.quantize_model(model, inplace=True)
    assert q is model and isinstance(model.classifier, QuantLinear)


def test_shared_module_replaced_once():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    q = oqfl_ext.quantize_model(model, first_last_bits=None)
    assert isinstance(q[0], QuantLinear) and q[0] is q[2]


def test_subclasses_are_left_alone():
    # MultiheadAttention reads its out_proj (a Linear subclass) weight without calling it
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2)
    q = oqfl_ext.quantize_model(model, first_last_bits=None)
    assert isinstance(q[0], QuantLinear)
    assert type(q.attn.out_proj) is type(model.attn.out_proj)
    assert "float" in quantization_summary(q).splitlines()[-1]


def test_bad_arguments():
    model = models.SmallCNN()
    for kw, name in ((dict(weight_bits=9), "weight_bits"), (dict(act_bits=1), "act_bits"),
                     (dict(first_last_bits=0), "first_last_bits"),
                     (dict(overrides={"nope": 4}), "overrides"),
                     (dict(overrides={"classifier": {"bits": 4}}), "overrides"),
                     (dict(overrides={"classifier": {"weight_bits": 12}}), "weight_bits"),
                     (dict(overrides={"classifier": "4"}), "overrides")):
        with pytest.raises(ValueError, match=re.escape(name)):
            oqfl_ext.quantize_model(model, **kw)
    with pytest.raises(TypeError, match="model"):
        oqfl_ext.quantize_model("resnet")
    with pytest.raises(ValueError, match="from_float"):
        oqfl_ext.quantize_model(nn.Linear(3, 3))


def test_summary_and_verbose(capsys):
    model = models.SmallCNN()
    q = oqfl_ext.quantize_model(model, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == quantization_summary(q)
    rows = printed.strip().splitlines()[2:]
    assert len(rows) == len(_layers(model)) == 4
    assert rows[0].split("|")[4].strip() == "8" and rows[1].split("|")[4].strip() == "4"
    assert "auto" in rows[1]
    calibrate(q, torch.randn(2, 1, 28, 28))
    rows = quantization_summary(q).splitlines()[2:]
    assert "signed+offset" in rows[0] and "unsigned" in rows[1]


def test_set_quantizers_enabled_gives_the_float_model():
    model = models.SmallCNN().eval()
    q = oqfl_ext.quantize_model(model)
    x = torch.randn(3, 1, 28, 28)
    set_quantizers_enabled(q, False)
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=0)
    assert not any(m.is_initialized() for m in q.modules() if isinstance(m, LSQQuantizer))
    set_quantizers_enabled(q, True)
    assert not torch.allclose(q(x), model(x), atol=1e-4)


def test_quantizer_options_reach_every_new_quantizer():
    from oqfl_ext.nn import QUANT_DEFAULTS
    net = models.create("vgg", in_channels=1, num_classes=10, image_size=8, width=4)
    default = oqfl_ext.quantize_model(net)
    lsq = oqfl_ext.quantize_model(net, init="lsq", grad_factor=1.0,
                         overrides={"features.0.0": {"act_bits": None}})
    pairs = {name: {(q.init, q.grad_factor) for q in m.modules() if isinstance(q, LSQQuantizer)}
             for name, m in (("default", default), ("lsq", lsq))}
    assert pairs == {"default": {(QUANT_DEFAULTS["init"], None)}, "lsq": {("lsq", 1.0)}}
    # the option is used: LSQ's init gives the first layer's weights 2 mean|w| / sqrt(qmax)
    lsq(torch.randn(4, 1, 8, 8))
    conv = lsq.features[0][0]
    want = 2 * conv.weight.detach().abs().mean(dim=(1, 2, 3)) / (127 ** 0.5)
    torch.testing.assert_close(conv.weight_quantizer.step_size.detach().flatten(), want)
    for kwargs, match in (({"init": "max"}, "init expected one of"),
                          ({"grad_factor": 0.0}, "grad_factor expected None or a positive"),
                          ({"grad_factor": True}, "grad_factor expected"),
                          ({"grad_factor": float("nan")}, "grad_factor expected")):
        with pytest.raises(ValueError, match=match):
            oqfl_ext.quantize_model(net, **kwargs)
    with pytest.raises(TypeError):
        oqfl_ext.quantize_model(net, 4, 4, 8, None, False, False, "lsq")  # keyword-only


def test_post_training_quantize_calibrates_in_eval_mode_and_leaves_the_model():
    from oqfl_ext.nn import post_training_quantize
    torch.manual_seed(0)
    net = models.create("vgg", in_channels=1, num_classes=10, image_size=8, width=4)
    net.train()
    net(torch.randn(32, 1, 8, 8) * 3 + 1)                   # running statistics away from 0/1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    q = post_training_quantize(net, x, 4, 4, first_last_bits="float")
    assert not q.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    qlayers = [m for _, m in _layers(q) if isinstance(m, (QuantConv2d, QuantLinear))]
    assert qlayers and all(m.act_quantizer.is_initialized() for m in qlayers)
    assert {m.weight_quantizer.init for m in qlayers} == {"mse"}
    # the same steps as calibrating a quantize_model copy by hand in eval mode, without
    # changing the batch-norm statistics
    by_hand = oqfl_ext.quantize_model(net, 4, 4, first_last_bits="float", init="mse").eval()
    with torch.no_grad():
        by_hand(x)
    got, want = q.state_dict(), by_hand.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="calibration_inputs"):
        post_training_quantize(net, torch.empty(0, 1, 8, 8))
