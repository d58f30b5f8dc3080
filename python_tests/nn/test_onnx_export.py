"""oqfl_ext.export_onnx: ONNX Runtime runs the exported graph and agrees with the package's
integer model (docs/DESIGN.md section 7.3).

The reference is the package's own integer model (``convert``'s IntegerGraph), itself checked
bit for bit against an int64 reference in test_convert_graph.py. The exported graph computes
the same codes, the same exact integer sums and the same float32 epilogue operation by
operation, so its outputs equal the package's bit for bit, except where ONNX Runtime sums in
another order (global average pooling, float Conv2d/Linear layers kept by quantize_model:
float32 rounding, which can move a code of the next layer that sits on a rounding tie). Stated bounds, checked below:

* without average pooling or float layers (small_cnn, vgg, the blocks): bit-identical outputs;
* with them: the same class on >= 99.9 % of the inputs (all of them where fewer than 1000 are
  run), and logits within ``LOGIT_BOUND`` of their scale for >= 99 % of the inputs (the others
  differ by the few input codes of the classifier that moved). With ONNX Runtime 1.32 on an
  AVX2 CPU every output was bit-identical here too.

Skipped without onnx / onnxruntime, unless OQFL_REQUIRE_ONNX=1 (then it fails).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import LSQQuantizer, calibrate, convert

from helpers import settle_batchnorm

if os.environ.get("OQFL_REQUIRE_ONNX") == "1":  # CI: a missing extra is a failure, not a skip
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'oqfl_ext[onnx]')")
ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime not installed (pip install 'oqfl_ext[onnx]')")

from oqfl_ext import export_onnx  # noqa: E402

# the float32 rounding of a reordered mean, carried through the classifier: 1e-5 of the logits'
# scale (the bound test_convert_graph.py states for float rounding)
LOGIT_BOUND = 1e-5


def _settle_and_quantize(model: nn.Module, x: torch.Tensor, **quant) -> nn.Module:
    """Real BatchNorm statistics (of x) and non-trivial affine parameters, then quantize and
    calibrate on x (random weights, settled statistics)."""
    settle_batchnorm(model, x)
    model = oqfl_ext.quantize_model(model.eval(), **quant)
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.init = "lsq"
    calibrate(model.eval(), x)
    return model.eval()


def _session(path, threads: int = 1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: x[i:i + batch].numpy()})[0])
                      for i in range(0, len(x), batch)])


def _ours(gm, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(x[i:i + batch]) for i in range(0, len(x), batch)])


def _agreement(got: torch.Tensor, want: torch.Tensor):
    """(share of inputs with the same class, share with logits within LOGIT_BOUND)."""
    same = (got.argmax(1) == want.argmax(1)).float().mean().item()
    scale = want.abs().max().item()
    close = ((got - want).abs().amax(1) <= LOGIT_BOUND * scale).float().mean().item()
    return same, close


def _has_average_pooling(gm) -> bool:
    return any(isinstance(m, nn.AdaptiveAvgPool2d) for m in gm.modules()) or any(
        n.target is F.adaptive_avg_pool2d for n in getattr(gm, "graph", fx.Graph()).nodes)


def _check(gm, x, path, example=None, float_layers=False):
    """Export, run and compare; returns the ONNX outputs. ``float_layers``: the model keeps
    float Conv2d/Linear layers (ONNX Runtime sums them in another order)."""
    proto = export_onnx(gm, path, x[:2] if example is None else example)
    assert path.exists() and onnx.load(str(path)).graph.node
    assert [v.name for v in proto.graph.output] == ["output"]
    ops_used = {n.op_type for n in proto.graph.node}
    assert ops_used & {"ConvInteger", "MatMulInteger"}
    # no float convolution or GEMM unless the model has one
    assert bool(ops_used & {"Conv", "Gemm", "MatMul"}) == float_layers
    got = _run(_session(path), x)
    want = _ours(gm, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    if not _has_average_pooling(gm) and not float_layers:
        assert torch.equal(got, want), (got - want).abs().max()
    same, close = _agreement(got, want)
    assert same >= 0.999 and close >= 0.99, (same, close)
    return got


# ------------------------------------------------------------------------------------------
# whole networks

# (name, kwargs, (channels, side), inputs): fewer inputs where the package's portable kernels
# are slow (depthwise convolutions); with fewer than 1000 inputs, >= 99.9 % means all of them
ZOO = [
    ("small_cnn", dict(in_channels=1, image_size=16, width=8), (1, 16), 1000),
    ("vgg", dict(width=8, hidden=32, image_size=16), (3, 16), 1000),
    ("resnet20", dict(image_size=16), (3, 16), 500),
    ("mobilenet_v2", dict(last_channels=64, image_size=16), (3, 16), 200),
]


@pytest.mark.parametrize("name,kwargs,shape,n", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_models_match_onnxruntime(name, kwargs, shape, n, tmp_path):
    torch.manual_seed(0)
    c, side = shape
    x = torch.randn(n, c, side, side)
    gm = convert(_settle_and_quantize(models.create(name, **kwargs), x[:64]))
    _check(gm, x, tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("bits", [2, 8])
def test_other_bit_widths(bits, tmp_path):
    """2-bit codes in INT4 storage, 8-bit everywhere (u8 x u8 weights), signed 8-bit inputs."""
    torch.manual_seed(1)
    x = torch.randn(1000, 1, 16, 16)
    model = models.create("small_cnn", in_channels=1, image_size=16, width=8)
    gm = convert(_settle_and_quantize(model, x[:64], weight_bits=bits, act_bits=bits))
    _check(gm, x, tmp_path / "m.onnx")


@pytest.mark.parametrize("ctor", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_match_onnxruntime(ctor, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(200, 3, 32, 32)
    model = getattr(torchvision.models, ctor)(num_classes=10)
    gm = convert(_settle_and_quantize(model, x[:32]))
    _check(gm, x, tmp_path / f"{ctor}.onnx")


def test_trained_fashion_mnist_model_keeps_its_predictions(tmp_path):
    """SmallCNN trained briefly (W4A4, 8-bit first and last layers) on Fashion-MNIST: ONNX
    Runtime gives the integer model's class on >= 99.9 % of the 10000 test images (here: the
    same logits, bit for bit)."""
    from oqfl_ext.data import fashion_mnist_dir, load_fashion_mnist
    if fashion_mnist_dir() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x_train, y_train = load_fashion_mnist("train", limit=2000, normalize=True)
    x_test, y_test = load_fashion_mnist("test", normalize=True)
    torch.manual_seed(0)
    model = oqfl_ext.quantize_model(models.create("small_cnn", in_channels=1, image_size=28,
                                                  width=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for i in range(0, len(x_train), 64):
        loss = F.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm = convert(model.eval())
    got = _check(gm, x_test, tmp_path / "fmnist.onnx")
    # the model learned something, so the agreement is not between two constant outputs
    assert (got.argmax(1) == y_test).float().mean() > 0.5


# ------------------------------------------------------------------------------------------
# the patterns one by one

class _Block(nn.Module):
    """Signed inputs with a non-integer offset, a reflect-padded conv, a grouped conv with
    ReLU6, a residual add, a float max pooling read twice, codes through flatten to linears."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1, padding="same")
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        z = F.relu6(self.bn2(self.c2(y)))
        y = self.pool(self.c3(z) + y)
        y = torch.flatten(self.pool(F.relu(y)), 1)
        return self.fc2(F.relu(self.fc1(y)))


def test_block_patterns_are_bit_identical(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(400, 3, 16, 16)
    model = _settle_and_quantize(_Block(), x[:64], first_last_bits=None)
    with torch.no_grad():   # a non-integer LSQ+ offset on the signed first input
        model.c1.act_quantizer.offset.add_(0.37)
    gm = convert(model)
    assert gm.fusions["c2"].relu and gm.fusions["c2"].clamp_max == 6.0
    assert gm.fusions["c3"].residual
    assert gm.fusions["fc1"].out_codes == "fc2"
    got = _check(gm, x, tmp_path / "block.onnx")
    # another batch size than the example's (the batch dimension is symbolic)
    assert torch.equal(_run(_session(tmp_path / "block.onnx"), x[:3]), got[:3])


def test_layer_by_layer_conversion_exports(tmp_path):
    """convert(fuse=False) keeps BatchNorm and ReLU in float: exported as ONNX float ops."""
    torch.manual_seed(3)
    x = torch.randn(300, 1, 16, 16)
    model = _settle_and_quantize(models.create("small_cnn", in_channels=1, image_size=16,
                                               width=8), x[:64])
    _check(convert(model, fuse=False), x, tmp_path / "lbl.onnx")


def test_layers_kept_in_float_export_as_float_onnx_ops(tmp_path):
    """quantize_model(overrides={name: None}) keeps nn.Conv2d / nn.Linear: ONNX Conv / MatMul
    (float32 sums in ONNX Runtime's order, so the bound, not bit equality)."""
    torch.manual_seed(5)
    x = torch.randn(1000, 1, 16, 16)
    model = models.create("small_cnn", in_channels=1, image_size=16, width=8)
    model = _settle_and_quantize(model, x[:64],
                                 overrides={"features.0.0": None, "classifier": None})
    gm = convert(model)
    assert type(gm.get_submodule("features.0.0")) is nn.Conv2d
    _check(gm, x, tmp_path / "float.onnx", float_layers=True)


def test_int4_storage_keeps_outputs_and_halves_the_weights(tmp_path):
    torch.manual_seed(4)
    x = torch.randn(64, 3, 16, 16)
    gm = convert(_settle_and_quantize(models.create("resnet20", image_size=16), x))
    a = export_onnx(gm, tmp_path / "a.onnx", x[:1])
    b = export_onnx(gm, tmp_path / "b.onnx", x[:1], int4_weights=False)
    int4 = [t for t in a.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert int4 and not any(t.data_type == onnx.TensorProto.INT4 for t in b.graph.initializer)
    # the INT4 tensors decode to the layers' own codes
    for t in int4:
        lname = t.name.rsplit(".w4", 1)[0]
        want = gm.get_submodule(lname).weight_codes()
        got = torch.from_numpy(onnx.numpy_helper.to_array(t).astype("int8"))
        assert torch.equal(got.reshape(want.shape), want), lname
    assert (tmp_path / "a.onnx").stat().st_size < 0.7 * (tmp_path / "b.onnx").stat().st_size
    assert torch.equal(_run(_session(tmp_path / "a.onnx"), x),
                       _run(_session(tmp_path / "b.onnx"), x))


# ------------------------------------------------------------------------------------------
# errors

def test_fake_quant_layers_and_unknown_operations_are_refused(tmp_path):
    x = torch.randn(8, 1, 16, 16)
    model = _settle_and_quantize(models.create("small_cnn", in_channels=1, image_size=16,
                                               width=8), x)
    model.features[1][0].act_quantizer.enabled = False   # stays fake-quant
    with pytest.warns(oqfl_ext.nn.ConversionWarning):
        gm = convert(model)
    with pytest.raises(ValueError, match=r"features\.1\.0.*fake-quant"):
        export_onnx(gm, tmp_path / "m.onnx", x)

    class Sigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    xs = torch.randn(8, 4)
    gm = convert(_settle_and_quantize(Sigmoid(), xs, first_last_bits=None))
    with pytest.raises(ValueError, match="sigmoid.*no ONNX mapping"):
        export_onnx(gm, tmp_path / "m.onnx", xs)

    # ceil_mode's last-window rule is not mapped (not checked against ONNX Runtime): refused
    ceil = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(8, 1, 9, 9)
    gm = convert(_settle_and_quantize(ceil, x, first_last_bits=None))
    with pytest.raises(ValueError, match="ceil_mode"):
        export_onnx(gm, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments(tmp_path):
    x = torch.randn(4, 1, 16, 16)
    gm = convert(_settle_and_quantize(models.create("small_cnn", in_channels=1, image_size=16,
                                                    width=8), x))
    with pytest.raises(ValueError, match="example_input expected a float32 tensor"):
        export_onnx(gm, tmp_path / "m.onnx", x.double())
    with pytest.raises(ValueError, match="opset expected an int >= 21"):
        export_onnx(gm, tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(ValueError, match="int4_weights expected True or False"):
        export_onnx(gm, tmp_path / "m.onnx", x, int4_weights=1)
    with pytest.raises(ValueError, match="no integer layer"):
        export_onnx(nn.Sequential(nn.Linear(3, 3)), tmp_path / "m.onnx", torch.randn(2, 3))
    with pytest.raises(TypeError, match="model expected an nn.Module"):
        export_onnx("model", tmp_path / "m.onnx", x)
