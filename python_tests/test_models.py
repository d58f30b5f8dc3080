"""oqfl_ext.models (the zoo) and oqfl_ext.cost (parameter bytes and BitOPs), the latter against
counts written out by hand from the layer shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import LSQQuantizer

ZOO = sorted(models.MODELS)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 28), (1, 32)])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_shapes(name, channels, size):
    model = models.create(name, in_channels=channels, num_classes=7, image_size=size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_rejects_wrong_input(name):
    model = models.create(name, in_channels=1, image_size=28)
    for bad in (torch.randn(2, 3, 28, 28), torch.randn(2, 1, 32, 32), torch.randn(1, 28, 28)):
        with pytest.raises(ValueError, match=r"input expected shape \(N, 1, 28, 28\)"):
            model(bad)


def test_zoo_bad_arguments():
    for kw, name in ((dict(in_channels=0), "in_channels"), (dict(image_size=2), "image_size"),
                     (dict(num_classes=1), "num_classes"), (dict(in_channels=1.5), "in_channels")):
        with pytest.raises(ValueError, match=name):
            models.create("small_cnn", **kw)
    with pytest.raises(ValueError, match="name"):
        models.create("alexnet")
    with pytest.raises(ValueError, match="width"):
        models.SmallCNN(width=0)


def test_resnet20_structure():
    model = models.ResNet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 19 3x3 convolutions + 2 projection shortcuts, one linear layer: ResNet-20
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.29e6


def test_mobilenet_uses_depthwise_convolutions():
    model = models.MobileNetV2()
    assert any(m.groups == m.in_channels > 1 for m in model.modules() if isinstance(m, nn.Conv2d))


def _built_sizes(model):
    kinds = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.Linear: "linear"}
    return [(kinds[type(m)], m.num_features if type(m) is nn.BatchNorm2d else m.weight.numel())
            for m in model.modules() if type(m) in kinds]


@pytest.mark.parametrize("name,kwargs", [
    ("small_cnn", {}), ("small_cnn", dict(in_channels=1, image_size=28, width=5)),
    ("small_cnn", dict(num_classes=3, image_size=9)),
    ("vgg", {}), ("vgg", dict(in_channels=1, width=3, hidden=17, image_size=20)),
    ("resnet20", {}), ("resnet20", dict(blocks_per_stage=1, num_classes=4, image_size=4)),
    ("resnet20", dict(blocks_per_stage=5, in_channels=2)),
    ("mobilenet_v2", {}), ("mobilenet_v2", dict(last_channels=7, in_channels=1, image_size=28)),
])
def test_layer_sizes_match_the_built_model(name, kwargs):
    # computed without building; the built model is the reference
    assert models.layer_sizes(name, **kwargs) == _built_sizes(models.create(name, **kwargs))


def test_argument_ranges_are_checked_before_anything_is_built():
    cases = [
        ("resnet20", dict(blocks_per_stage=65536), r"blocks_per_stage expected an integer in "
                                                   r"\[1, 64\], got 65536"),
        ("resnet20", dict(blocks_per_stage=0), "blocks_per_stage"),
        ("vgg", dict(width=4096), r"width expected an integer in \[1, 1024\]"),
        ("vgg", dict(hidden=True), "hidden"),
        ("small_cnn", dict(width="8"), "width"),
        ("small_cnn", dict(image_size=7), r"image_size expected an integer in \[8, 1024\]"),
        ("mobilenet_v2", dict(last_channels=10 ** 9), "last_channels"),
        ("mobilenet_v2", dict(num_classes=1), "num_classes"),
        ("small_cnn", dict(in_channels=65), "in_channels"),
        ("small_cnn", dict(depth=3), r"'depth' is not an argument of oqfl_ext.models.create"),
        ("resnet20", dict(width=8), "'width' is not an argument"),
        ("alexnet", {}, "name expected one of"),
    ]
    for name, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            models.check_arguments(name, kwargs)
        with pytest.raises(ValueError, match=match):
            models.layer_sizes(name, **kwargs)
    # the limits themselves are accepted
    for name in ZOO:
        models.check_arguments(name, {"in_channels": 64, "num_classes": 100_000,
                                      "image_size": 1024})
    models.check_arguments("resnet20", {"blocks_per_stage": 64, "image_size": 4})


# ---------------------------------------------------------------- cost


def test_cost_small_cnn_by_hand():
    model = oqfl_ext.quantize_model(models.SmallCNN(in_channels=1, image_size=28, width=16))
    report = oqfl_ext.cost(model, (1, 28, 28))
    # (MACs, weight elements, W bits, A bits, weight step sizes, input quantizer parameters,
    # bias elements) per layer
    expect = {
        "features.0.0": (28 * 28 * 16 * 1 * 9, 16 * 1 * 9, 8, 8, 16, 2, 0),
        "features.1.0": (28 * 28 * 16 * 16 * 9, 16 * 16 * 9, 4, 4, 16, 2, 0),
        "features.3.0": (14 * 14 * 32 * 16 * 9, 32 * 16 * 9, 4, 4, 32, 2, 0),
        "classifier": (32 * 7 * 7 * 10, 32 * 7 * 7 * 10, 8, 8, 10, 2, 10),
    }
    assert [c.name for c in report.layers] == list(expect)
    for c in report.layers:
        macs, n_w, wb, ab, n_steps, n_act, n_bias = expect[c.name]
        assert (c.macs, c.weight_bits, c.act_bits) == (macs, wb, ab), c.name
        assert c.bitops == macs * wb * ab
        assert c.param_bytes == n_w * wb / 8 + 4 * (n_steps + n_act + n_bias), c.name
    bn_bytes = 4 * 2 * (16 + 16 + 32)
    assert report.other_param_bytes == bn_bytes
    assert report.macs == sum(v[0] for v in expect.values())
    assert report.bitops == sum(v[0] * v[2] * v[3] for v in expect.values())
    float_bytes = 4 * (sum(v[1] + v[6] for v in expect.values())) + bn_bytes
    assert report.float_param_bytes == float_bytes
    assert report.compression == pytest.approx(float_bytes / report.param_bytes)
    assert "| **total** |" in report.table() and str(report) == report.table()


def test_cost_float_resnet20_macs():
    report = oqfl_ext.cost(models.ResNet20(), (3, 32, 32))
    conv3 = 9 * 32 * 32 * 16 * 16  # every 3x3 conv of a stage costs the same
    want = (32 * 32 * 16 * 3 * 9          # stem
            + 6 * conv3                   # stage 1
            + conv3 // 2 + 5 * conv3      # stage 2: the strided conv, then five
            + 16 * 16 * 32 * 16           # 1x1 projection
            + conv3 // 2 + 5 * conv3      # stage 3
            + 8 * 8 * 64 * 32             # 1x1 projection
            + 64 * 10)                    # fc
    assert report.macs == want == 40_813_184
    assert all(c.weight_bits == 32 and c.act_bits == 32 for c in report.layers)
    assert report.bitops == want * 32 * 32
    assert report.param_bytes == report.float_param_bytes


def test_cost_leaves_the_model_alone():
    model = oqfl_ext.quantize_model(models.SmallCNN()).train()
    bn = model.features[0][1]
    running = bn.running_mean.clone()
    report = oqfl_ext.cost(model, (2, 1, 28, 28))
    assert report.layers[0].macs == 2 * 28 * 28 * 16 * 9  # a batch of two
    assert model.training and bn.training and torch.equal(bn.running_mean, running)
    assert not any(q.is_initialized() for q in model.modules() if isinstance(q, LSQQuantizer))
    assert all(q.enabled for q in model.modules() if isinstance(q, LSQQuantizer))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_cost_bad_input_shape():
    for bad in ((28,), (1, 0, 28), (1, -28, 28)):
        with pytest.raises(ValueError, match="input_shape"):
            oqfl_ext.cost(models.SmallCNN(), bad)
    with pytest.raises(ValueError, match="input expected shape"):
        oqfl_ext.cost(models.SmallCNN(), (3, 28, 28))
