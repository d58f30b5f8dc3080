"""The C++ plan of an IntegerGraph (oqfl_ext/nn/plan.py, csrc/integer_plan.cpp).

A forward through the plan calls the same ops with the same arguments as the graph's Python
forward, so the two must agree bit for bit; the fused-graph tests (test_convert_graph.py) check
the plan's result against the float64 integer reference. Here: the plan's own max pooling on
codes (against F.max_pool2d in float64) and on float32 (against F.max_pool2d), plan versus Python forward on the zoo, and when the plan
must not run or must be rebuilt (hooks, changed buffers, replaced modules, unsupported nodes).
"""

from __future__ import annotations

import copy
import gc
import itertools
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.nn import LSQQuantizer, calibrate, convert, load_packed, save_packed

from helpers import settle_batchnorm


def _prepared(name="resnet20", bits=4, shape=(4, 3, 16, 16), **kwargs):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = models.create(name, in_channels=shape[1], image_size=shape[-1], **kwargs)
    settle_batchnorm(model, x)
    model = oqfl_ext.quantize_model(model, weight_bits=bits, act_bits=bits)
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.init = "lsq"
    calibrate(model.eval(), x)
    return model, x


def _both(gm, x):
    """The plan's and the Python graph's outputs (and the plan's status)."""
    status = gm.plan_status()
    with torch.no_grad():
        got = gm(x)
        gm.run_plan = False
        try:
            want = gm(x)
        finally:
            gm.run_plan = True
    return got, want, status


def _max_pool_plan(ints):
    p = torch.classes.oqfl.IntegerPlan()
    p.add_max_pool(1, 0, ints)
    p.finish(1)
    return p


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_max_pooling_on_codes_equals_float64_max_pooling(dtype):
    g = torch.Generator().manual_seed(1)
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max + 1, (2, 5, 13, 17), generator=g).to(dtype)
    before = x.clone()
    cases = 0
    for k, s, p, d, ceil in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2),
                                              (False, True)):
        if p > k // 2:
            continue
        plan = _max_pool_plan([k, k, s, s, p, p, d, d, int(ceil), 1])
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            want = F.max_pool2d(xx.double(), k, s, p, d, ceil)
            got = plan.run(xx)
            assert got.dtype == dtype and got.shape == want.shape
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got.double(), want), (k, s, p, d, ceil)
            cases += 1
    assert cases > 50 and torch.equal(x, before)
    # rectangular windows and the smallest code everywhere (padding must not win)
    big = torch.full((1, 2, 30, 20), info.min, dtype=dtype)
    big[0, 1, 5, 7] = info.max
    got = _max_pool_plan([3, 2, 2, 1, 1, 0, 1, 1, 0, 1]).run(big)
    assert torch.equal(got.double(), F.max_pool2d(big.double(), (3, 2), (2, 1), (1, 0)))


def test_float_max_pooling_equals_pytorchs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 13, 11, generator=g)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, :4, :4] = float("-inf")
    x[1, 3] = 0.5   # ties
    x = x.contiguous(memory_format=torch.channels_last)
    cases = 0
    for k, s, p, d, ceil in itertools.product((1, 2, 3), (1, 2), (0, 1), (1, 2), (False, True)):
        if p > k // 2:
            continue
        plan = _max_pool_plan([k, k, s, s, p, p, d, d, int(ceil), 0])
        got, want = plan.run(x), F.max_pool2d(x, k, s, p, d, ceil)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert got.is_contiguous(memory_format=torch.channels_last)
        cases += 1
    assert cases > 30
    # an NCHW input takes PyTorch's own pooling
    nchw = x.contiguous()
    torch.testing.assert_close(_max_pool_plan([3, 3, 2, 2, 1, 1, 1, 1, 0, 0]).run(nchw),
                               F.max_pool2d(nchw, 3, 2, 1), rtol=0, atol=0, equal_nan=True)


def test_plan_arguments_are_checked():
    p = torch.classes.oqfl.IntegerPlan()
    with pytest.raises(RuntimeError, match="next free slot"):
        p.add_flatten(2, 0, 1, -1)
    with pytest.raises(RuntimeError, match="not written by an earlier step"):
        p.add_flatten(1, 3, 1, -1)
    with pytest.raises(RuntimeError, match="ints expected 10 values"):
        p.add_max_pool(1, 0, [2, 2])
    with pytest.raises(RuntimeError, match="not finished"):
        p.run(torch.zeros(1))
    p.add_flatten(1, 0, 1, -1)
    p.finish(1)
    with pytest.raises(RuntimeError, match="after finish"):
        p.add_flatten(2, 1, 0, -1)


ZOO = [("small_cnn", dict(width=8), (4, 1, 16, 16)),
       ("vgg", dict(width=8, hidden=32), (4, 3, 16, 16)),
       ("resnet20", {}, (4, 3, 16, 16)),
       ("mobilenet_v2", dict(last_channels=64), (4, 3, 16, 16))]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_plan_equals_the_python_graph(name, kwargs, shape, bits):
    model, x = _prepared(name, bits, shape, **kwargs)
    gm = convert(model)
    got, want, status = _both(gm, x)
    assert status.startswith("C++ plan"), status
    assert torch.equal(got, want)
    # one image, and a copy of the model, run their plans too
    one, want_one, _ = _both(gm, x[:1])
    assert torch.equal(one, want_one)
    twin = copy.deepcopy(gm)
    assert twin.plan_status().startswith("C++ plan")
    with torch.no_grad():
        assert torch.equal(twin(x), want)
    # the zoo's input check runs before the plan
    with pytest.raises(ValueError, match="input expected shape"):
        gm(torch.randn(2, shape[1], shape[2] + 1, shape[3]))


def test_plan_follows_changes_to_the_model(tmp_path):
    model, x = _prepared()
    gm = convert(model)
    conv = gm.get_submodule("layer1.0.conv1")
    with torch.no_grad():
        before = gm(x)
        # a new buffer: the plan is rebuilt
        conv.w_scale = conv.w_scale * 1.5
        got, want, status = _both(gm, x)
        assert status.startswith("C++ plan") and torch.equal(got, want)
        assert not torch.equal(got, before)
        # values loaded in place
        other = convert(_prepared(bits=4)[0])
        gm.load_state_dict(copy.deepcopy(other.state_dict()))
        assert torch.equal(gm(x), other(x))
        # a replaced module
        gm.get_submodule("layer1.0").conv1 = copy.deepcopy(conv)
        got, want, _ = _both(gm, x)
        assert torch.equal(got, want)
    # a forward hook runs: the Python graph runs
    seen = []
    h = conv.register_forward_hook(lambda m, a, y: seen.append(y.shape))
    try:
        gm.get_submodule("layer1.0").conv1 = conv
        assert "hook" in gm.plan_status()
        with torch.no_grad():
            gm(x)
        assert len(seen) == 1
    finally:
        h.remove()
    assert gm.plan_status().startswith("C++ plan")
    # a saved and loaded model runs its plan and gives the same logits
    path = tmp_path / "m.safetensors"
    save_packed(gm, path)
    back = load_packed(path)
    assert back.plan_status().startswith("C++ plan")
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))


class _FloatTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.act(self.conv(x))


def test_unsupported_graphs_and_inputs_run_the_python_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = oqfl_ext.quantize_model(_FloatTail(), weight_bits=8, act_bits=8)
    calibrate(model.eval(), x)
    gm = convert(model)
    status = gm.plan_status()
    assert status.startswith("Python graph") and "Sigmoid" in status, status
    with torch.no_grad():
        assert torch.equal(gm(x), gm._graph_forward(x))
    # a float64 input runs the Python graph (its layers compute in float32): same values
    model, x = _prepared()
    gm = convert(model)
    with torch.no_grad():
        assert torch.equal(gm(x.double()).double(), gm(x).double())


def test_torch_compile_traces_the_python_graph():
    # dynamo must not meet the C++ plan (an opaque object): under compilation the forward is
    # the graph's, traced whole, and gives the plan's logits
    model, x = _prepared(bits=4, shape=(2, 3, 16, 16))
    gm = convert(model)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), gm(x))


def test_a_converted_model_with_a_plan_is_freed():
    # the plan (kept beside the model, keyed weakly by it) must not keep the model alive
    model, x = _prepared(shape=(1, 3, 16, 16))
    gm = convert(model)
    with torch.no_grad():
        gm(x)
    assert gm.plan_status().startswith("C++ plan")
    ref = weakref.ref(gm)
    del gm
    gc.collect()
    assert ref() is None


class _PoolTail(nn.Module):
    """A quantized conv whose float output goes through pooling modules and flatten."""

    def __init__(self, pool_size=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(pool_size)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()

    def forward(self, x):
        return self.flat(self.gap(self.pool(self.conv(x))))


def _pool_tail(pool_size=2):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    model = oqfl_ext.quantize_model(_PoolTail(pool_size), weight_bits=8, act_bits=8)
    calibrate(model.eval(), x)
    return convert(model), x


def test_plan_follows_replaced_ancestors_and_module_settings():
    model, x = _prepared()
    gm = convert(model)
    with torch.no_grad():
        gm(x)
        # a replaced ancestor, the old one still alive: its layers are no longer the graph's
        old = gm.layer1
        new_stage = copy.deepcopy(old)
        new_stage.get_submodule("0.conv1").w_scale.mul_(3)
        gm.layer1 = new_stage
        got, want, status = _both(gm, x)
        assert status.startswith("C++ plan") and torch.equal(got, want)
        # an integer layer's setting changed after construction: both forwards keep the call
        # the layer was built with
        gm.fc.relu = True
        got, want, _ = _both(gm, x)
        assert torch.equal(got, want)
    # pooling and flatten settings are read again when they change
    gm, x = _pool_tail()
    with torch.no_grad():
        got, want, status = _both(gm, x)
        assert status.startswith("C++ plan") and torch.equal(got, want)
        gm.pool.kernel_size = gm.pool.stride = 3
        gm.gap.output_size = 2
        got, want, _ = _both(gm, x)
        assert got.shape == (2, 16) and torch.equal(got, want)


def test_one_element_pool_sizes_and_pooling_that_pytorch_refuses():
    gm, x = _pool_tail(pool_size=(2,))
    got, want, status = _both(gm, x)
    assert status.startswith("C++ plan") and torch.equal(got, want)
    # what F.max_pool2d refuses raises the same error from the plan
    y = torch.randn(1, 2, 1, 5).contiguous(memory_format=torch.channels_last)
    for ints, kwargs in (([3, 3, 1, 1, 0, 0, 1, 1, 0, 0], dict(kernel_size=3, stride=1)),
                         ([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dict(kernel_size=1, padding=1))):
        with pytest.raises(RuntimeError) as want_err:
            F.max_pool2d(y, **kwargs)
        with pytest.raises(RuntimeError) as got_err:
            _max_pool_plan(ints).run(y)
        assert str(want_err.value).split("\n")[0] in str(got_err.value)
