"""Federated training core (oqfl_ext.fl.Client / Server): FedAvg weighting, learning on real data
in float and at W4A4 with an int4 uplink, dropped and rejected clients, norm clipping, uplink
accounting and determinism. A tiny synthetic task for the mechanics; a 1500-image subset of
Fashion-MNIST (downsampled to 14x14) for learning. A few seconds on 2 cores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from oqfl_ext.data import fashion_mnist_dir, load_fashion_mnist, partition_iid
from oqfl_ext.fl import (Client, ClientConfig, Server, UpdateRejected, decode_update,
                         encode_update)
from oqfl_ext.fl.client import float_state
from oqfl_ext.models import SmallCNN
from oqfl_ext.nn import LSQQuantizer, quantize_model

# ----------------------------------------------------------------------------------------------
# a tiny synthetic task: 3 Gaussian blobs in 8 dimensions, linearly separable


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0] + [0.0] * 7, [0.0, 3.0] + [0.0] * 6, [0.0, 0.0, 3.0] + [0.0] * 5])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 8, generator=g)
    return x, y


def _mlp() -> nn.Module:
    # BatchNorm: float running stats are sent, num_batches_tracked (int) is not
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


CFG = ClientConfig(local_epochs=1, batch_size=16, lr=0.1, momentum=0.5, uplink_bits=32,
                   error_feedback=False)


def _clients(sizes, cfg=CFG, seed=0):
    return [Client(f"c{i}", _blobs(n, seed + 10 * i), cfg, seed=seed + i)
            for i, n in enumerate(sizes)]


TEST = _blobs(120, 999)


class Recording:
    """Wraps a client and keeps the blobs it returned."""

    def __init__(self, client, mutate=None):
        self.inner, self.client_id, self.mutate, self.blobs = client, client.client_id, mutate, []
        self.inputs = client.inputs

    def train(self, global_state, model_fn, *, round_idx=0):
        blob = self.inner.train(global_state, model_fn, round_idx=round_idx)
        if self.mutate is not None:
            blob = self.mutate(blob)
        self.blobs.append(blob)
        return blob


class Raising:
    client_id = "boom"

    def train(self, global_state, model_fn, *, round_idx=0):
        raise RuntimeError("device lost")


class Outlier:
    """Sends a huge update (float32)."""

    client_id = "outlier"

    def __init__(self):
        self.blobs = []

    def train(self, global_state, model_fn, *, round_idx=0):
        delta = {k: torch.full_like(v, 100.0) for k, v in float_state(global_state).items()}
        blob = encode_update(delta, bits=32, round=round_idx, client_id=self.client_id,
                             num_samples=40)
        self.blobs.append(blob)
        return blob


def _states_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _delta(server: Server, before: dict) -> dict:
    after = server.template()
    return {k: after[k] - before[k] for k in after}


# ----------------------------------------------------------------------------------------------
# (1) FedAvg weighting


def test_identical_clients_equal_one_client():
    one = Server(_mlp, TEST, clients=_clients([48]), seed=3)
    x, y = _blobs(48, 0)
    same = [Client(f"c{i}", (x, y), CFG, seed=0) for i in range(3)]
    three = Server(_mlp, TEST, clients=same, seed=3)
    assert _states_equal(one.template(), three.template())  # same seed: same initial model
    one.run_round(0)
    three.run_round(0)
    for k, v in one.template().items():
        torch.testing.assert_close(three.template()[k], v, rtol=1e-6, atol=1e-7)


def test_fedavg_weights_by_num_samples():
    cfg = ClientConfig(local_epochs=1, batch_size=16, lr=0.1, momentum=0.0, uplink_bits=8,
                       error_feedback=False)
    clients = [Recording(c) for c in _clients([16, 48, 96], cfg)]
    server = Server(_mlp, TEST, clients=clients, seed=1)
    before = server.template()
    nbt = server.model.state_dict()["1.num_batches_tracked"].clone()
    res = server.run_round(0)
    assert res.accepted == ["c0", "c1", "c2"] and not res.dropped and res.num_samples == 160
    decoded = [decode_update(c.blobs[0], before, return_info=True) for c in clients]
    assert [info["num_samples"] for _, info in decoded] == [16, 48, 96]
    expected = {k: sum(u[k] * (info["num_samples"] / 160) for u, info in decoded)
                for k in before}
    got = _delta(server, before)
    assert "1.num_batches_tracked" not in got  # not sent, kept from the global state
    assert torch.equal(server.model.state_dict()["1.num_batches_tracked"], nbt)
    for k in before:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    # not the unweighted mean
    unweighted = sum(u["0.weight"] for u, _ in decoded) / 3
    assert not torch.allclose(got["0.weight"], unweighted, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (2), (3) learning on Fashion-MNIST

needs_fmnist = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _fmnist(split: str, n: int):
    x, y = load_fashion_mnist(split, limit=n, normalize=True)
    return F.avg_pool2d(x, 2), y  # 14x14: 4x cheaper


@needs_fmnist
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "w4a4-int4-uplink"])
def test_fedavg_learns_fmnist(quantized):
    x, y = _fmnist("train", 1500)
    test = _fmnist("test", 500)
    parts = partition_iid(y, 3, seed=0)

    def model_fn():
        m = SmallCNN(in_channels=1, num_classes=10, image_size=14, width=8)
        return quantize_model(m, weight_bits=4, act_bits=4) if quantized else m

    cfg = ClientConfig(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9,
                       uplink_bits=4 if quantized else 32, error_feedback=quantized)
    clients = [Client(f"c{i}", (x[p], y[p]), cfg, seed=i) for i, p in enumerate(parts)]
    server = Server(model_fn, test, clients=clients, seed=0)
    if quantized:  # the server initialized every quantizer once, before any client trained
        qs = [m for m in server.model.modules() if isinstance(m, LSQQuantizer)]
        assert qs and all(q.is_initialized() for q in qs)
    acc0, _ = server.evaluate()
    results = [server.run_round(r) for r in range(3)]
    assert all(not r.dropped for r in results)
    assert acc0 < 0.25
    assert results[-1].accuracy > (0.5 if quantized else 0.6), [r.accuracy for r in results]
    assert results[-1].loss < results[0].loss + 0.1


# ----------------------------------------------------------------------------------------------
# (4), (5) dropped and rejected clients


def test_raising_client_is_dropped():
    server = Server(_mlp, TEST, clients=_clients([32, 32]) + [Raising()], seed=0)
    reference = Server(_mlp, TEST, clients=_clients([32, 32]), seed=0)
    res = server.run_round(0)
    reference.run_round(0)
    assert res.accepted == ["c0", "c1"]
    assert len(res.dropped) == 1 and res.dropped[0][0] == "boom"
    assert "RuntimeError" in res.dropped[0][1] and "device lost" in res.dropped[0][1]
    assert _states_equal(server.model.state_dict(), reference.model.state_dict())


def _flip_bit(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[len(b) - 7] ^= 0x10  # a bit of the tensor data
    return bytes(b)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_corrupted_blob_is_rejected(compression):
    cfg = ClientConfig(batch_size=16, lr=0.1, momentum=0.0, uplink_bits=4, error_feedback=False,
                       uplink_compression=compression)
    bad = Recording(_clients([32], cfg, seed=50)[0], mutate=_flip_bit)
    bad.client_id = bad.inner.client_id = "bad"
    good = _clients([32, 64], cfg)
    server = Server(_mlp, TEST, clients=good[:1] + [bad] + good[1:], seed=0,
                    uplink_compression=compression)
    reference = Server(_mlp, TEST, clients=_clients([32, 64], cfg), seed=0,
                       uplink_compression=compression)
    before = server.template()
    res = server.run_round(0)
    reference.run_round(0)
    assert res.accepted == ["c0", "c1"]
    assert [cid for cid, _ in res.dropped] == ["bad"]
    # the blob's digest, or first the compressed stream's own checks
    assert "rejected" in res.dropped[0][1]
    reason = res.dropped[0][1]
    assert "digest" in reason or (compression == "zstd" and "zstd" in reason), reason
    with pytest.raises(UpdateRejected):
        decode_update(bad.blobs[0], before, compression=compression)
    assert res.uplink_bytes > len(bad.blobs[0])  # the rejected blob was transmitted too
    assert _states_equal(server.model.state_dict(), reference.model.state_dict())


def test_wrong_round_is_rejected():
    class Stale(Outlier):
        client_id = "stale"

        def train(self, global_state, model_fn, *, round_idx=0):
            return super().train(global_state, model_fn, round_idx=round_idx + 1)

    server = Server(_mlp, TEST, clients=_clients([32]) + [Stale()], seed=0)
    res = server.run_round(0)
    assert res.accepted == ["c0"] and res.dropped[0][0] == "stale"
    assert "round" in res.dropped[0][1]


# ----------------------------------------------------------------------------------------------
# (6) norm clipping


def test_norm_bound_clips_outlier():
    outlier = Outlier()
    normal = Recording(_clients([40])[0])
    bound = 5.0
    server = Server(_mlp, TEST, clients=[normal, outlier], seed=0, norm_bound=bound)
    before = server.template()
    res = server.run_round(0)
    assert res.clipped == ["outlier"] and res.accepted == ["c0", "outlier"]
    u_normal = decode_update(normal.blobs[0], before)
    u_out = decode_update(outlier.blobs[0], before)
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in u_out.values()))
    assert norm > bound
    norm_normal = math.sqrt(sum(float(v.double().square().sum()) for v in u_normal.values()))
    assert norm_normal < bound  # the ordinary client is not clipped
    got = _delta(server, before)
    for k in before:
        expected = 0.5 * u_normal[k] + 0.5 * u_out[k] * (bound / norm)
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6)
    # without the bound the outlier dominates
    free = Server(_mlp, TEST, clients=[_clients([40])[0], Outlier()], seed=0)
    free.run_round(0)
    assert float((free.template()["0.weight"] - before["0.weight"]).abs().max()) > 40


# ----------------------------------------------------------------------------------------------
# (7) uplink accounting


@pytest.mark.parametrize("bits", [4, 32])
def test_uplink_bytes_is_sum_of_blob_lengths(bits):
    cfg = ClientConfig(batch_size=16, momentum=0.0, uplink_bits=bits, error_feedback=False)
    clients = [Recording(c) for c in _clients([20, 30, 40], cfg)]
    server = Server(_mlp, TEST, clients=clients, seed=0)
    for r in range(2):
        res = server.run_round(r)
        assert res.uplink_bytes == sum(len(c.blobs[r]) for c in clients)
        assert res.wall_time_s > 0 and 0 <= res.accuracy <= 1 and math.isfinite(res.loss)


# ----------------------------------------------------------------------------------------------
# (8) determinism, sampling, momentum, state_dict


def _run(seed: int, rounds: int = 2, **kw):
    cfg = ClientConfig(batch_size=16, lr=0.1, momentum=0.9, uplink_bits=4, error_feedback=True)
    server = Server(_mlp, TEST, clients=_clients([24, 32, 40, 48], cfg), seed=seed,
                    fraction=0.5, server_momentum=0.5, **kw)
    results = [server.run_round(r) for r in range(rounds)]
    return server, results


def test_same_seed_same_global_model():
    a, ra = _run(7)
    b, rb = _run(7)
    assert [r.sampled for r in ra] == [r.sampled for r in rb]
    assert all(len(r.sampled) == 2 for r in ra)
    assert _states_equal(a.model.state_dict(), b.model.state_dict())
    c, _ = _run(8)
    assert not _states_equal(a.model.state_dict(), c.model.state_dict())


def test_state_dict_round_trip_resumes_identically():
    a, _ = _run(5, rounds=1)
    state = a.state_dict()
    assert state["momentum"] is not None and state["round"] == 1
    a.run_round(1)
    b, _ = _run(5, rounds=0)
    b.load_state_dict(state)
    # the clients' error-feedback residuals live in the clients: copy them over
    for ca, cb in zip(_run(5, rounds=1)[0].clients, b.clients):
        cb.residual = ca.residual
    b.run_round(1)
    assert _states_equal(a.model.state_dict(), b.model.state_dict())
    assert all(torch.equal(a.momentum[k], b.momentum[k]) for k in a.momentum)


def test_error_feedback_keeps_residual():
    cfg = ClientConfig(batch_size=16, momentum=0.0, uplink_bits=4, error_feedback=True)
    client = _clients([32], cfg)[0]
    global_state = _mlp().state_dict()
    blob = client.train(global_state, _mlp, round_idx=0)
    sent = decode_update(blob, float_state(global_state))
    assert client.residual is not None and set(client.residual) == set(sent)
    assert any(float(v.abs().max()) > 0 for v in client.residual.values())
    # without error feedback: no residual
    plain = _clients([32], ClientConfig(batch_size=16, momentum=0.0, uplink_bits=4,
                                           error_feedback=False))[0]
    plain.train(global_state, _mlp, round_idx=0)
    assert plain.residual is None


def test_config_validation():
    for bad in (dict(uplink_bits=16), dict(local_epochs=0), dict(batch_size=0), dict(lr=-1.0)):
        with pytest.raises(ValueError):
            ClientConfig(**bad)
    with pytest.raises(ValueError):
        Server(_mlp, TEST, clients=_clients([8]), fraction=0.0)
    with pytest.raises(ValueError):
        Server(_mlp, TEST, clients=_clients([8]), norm_bound=-1.0)


def test_step_size_lr_scale_scales_only_the_quantizer_step():
    # one SGD step (one batch, no momentum) from the same state: the gradients are the same, so
    # the step sizes and offsets move by scale x what they move at scale 1; the weights equally
    def quant_mlp():
        torch.manual_seed(0)
        return quantize_model(_mlp(), weight_bits=4, act_bits=4, first_last_bits=None)

    template = quant_mlp()
    template.train()
    x, _ = _blobs(16, 1)
    template(x)                                        # initializes the quantizers
    state = template.state_dict()
    deltas = {}
    for scale in (1.0, 0.1):
        cfg = ClientConfig(local_epochs=1, batch_size=16, lr=0.1, momentum=0.0, uplink_bits=32,
                           step_size_lr_scale=scale)
        blob = Client("c", _blobs(16, 2), cfg, seed=3).train(
            {k: v.clone() for k, v in state.items()}, quant_mlp)
        deltas[scale] = decode_update(blob, float_state(state))
    quant = [k for k in deltas[1.0] if k.endswith(("step_size", "offset"))]
    assert quant and len(quant) < len(deltas[1.0])
    moved = 0.0
    for k, d in deltas[1.0].items():
        if k in quant:
            # float32 deltas of O(1) step sizes: a few ulps of the parameter, not of the delta
            torch.testing.assert_close(deltas[0.1][k], 0.1 * d, rtol=0, atol=3e-7)
            moved = max(moved, float(d.abs().max()))
        elif not k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(deltas[0.1][k], d, rtol=0, atol=0)
    assert moved > 100 * 3e-7, moved                   # a scale of 1 would fail the check
    with pytest.raises(ValueError, match="step_size_lr_scale"):
        ClientConfig(step_size_lr_scale=0.0)
