"""The compressed downlink (oqfl_ext.fl.downlink, Server(downlink="int4-delta"/"int8-delta")):

* in a run with partial participation every client that receives a round's blob holds the
  server's broadcast model bit for bit, clients that missed rounds included (they catch up with
  a chain of deltas or a snapshot, whichever is smaller);
* the broadcast model follows the global model within the codec's error (int4/int8 per-channel
  steps, half to even; bfloat16 vectors), checked against a float64 reference, and the error is
  fed back (the next delta carries it);
* round trips: snapshot and chains exact; held-model and server state through state_dict and a
  checkpoint resume (bit-identical continuation);
* corrupted, truncated, oversized and wrong-template blobs, and deltas for another base, are
  refused with clear errors and leave the client's model as it was;
* first contact with an initial template (the model built under the run's seed): a sparse
  snapshot (the entries the server changed before round 1) and the chain since it, far smaller
  than a full snapshot, leaving the client on the server's model bit for bit and the run exactly
  as with full snapshots; a client with another template (or none) refuses it and gets full
  snapshots from then on.
A tiny synthetic task (about a minute on a loaded 2-core machine)."""

from __future__ import annotations

import struct

import pytest
import torch
from torch import nn

from oqfl_ext.fl import Client, ClientConfig, Server, UpdateRejected
from oqfl_ext.fl.downlink import (DeltaBroadcast, HeldModel, apply_delta, parse_blob,
                                  raw_limit, state_digest)
from oqfl_ext.fl.server import downlink_codec, initial_model
from oqfl_ext.nn import quantize_model


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.eye(3, 8)
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, 8, generator=g), y


def _mlp() -> nn.Module:
    # BatchNorm: float running statistics and an int64 num_batches_tracked
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


CFG = ClientConfig(local_epochs=1, batch_size=16, lr=0.1, momentum=0.5, uplink_bits=4,
                   error_feedback=True)


def _server(downlink="int4-delta", n_clients=4, fraction=0.5, seed=0, template=None):
    clients = [Client(f"c{i}", _blobs(40, 10 * i), CFG, seed=i, initial_template=template)
               for i in range(n_clients)]
    return Server(_mlp, _blobs(90, 999), clients=clients, fraction=fraction, seed=seed,
                  downlink=downlink, initial_template=template)


def _quantized_mlp() -> nn.Module:
    # W4A4: the server calibrates the quantizers before round 1 (what first contact must carry)
    return quantize_model(nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)),
                          weight_bits=4, act_bits=4)


def _template(model_fn, seed=0):
    return {k: v.clone() for k, v in initial_model(model_fn, seed).state_dict().items()}


def _quantized_server(templates, server_template, fraction=0.5):
    clients = [Client(f"c{i}", _blobs(40, 10 * i), CFG, seed=i, initial_template=t)
               for i, t in enumerate(templates)]
    return Server(_quantized_mlp, _blobs(90, 999), clients=clients, fraction=fraction, seed=0,
                  downlink="int4-delta", initial_template=server_template)


def _assert_same(a, b, ordered=True):
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ a run

@pytest.mark.parametrize("downlink", ["int4-delta", "int8-delta"])
def test_every_client_holds_the_broadcast_model_bit_for_bit(downlink):
    server = _server(downlink)
    last_seen = {c.client_id: None for c in server.clients}
    caught_up = []
    for r in range(8):
        res = server.run_round(r)
        assert res.accepted == res.sampled, res.dropped
        b = server.broadcast
        for c in server.clients:
            if c.client_id in res.sampled:
                _assert_same(c.held.state, b.state)  # the model it trained from, exactly
                assert c.held.version == b.version and c.held.digest == state_digest(b.state)
                if last_seen[c.client_id] is not None and last_seen[c.client_id] < r - 1:
                    caught_up.append((c.client_id, r, c.client_id in res.downlink_snapshots))
                last_seen[c.client_id] = r
            elif last_seen[c.client_id] is not None:
                assert c.held.version < b.version  # missed this round: still the old model
        if r == 0:  # first contact: a snapshot
            assert res.downlink_snapshots == res.sampled
    assert any(not snap for _, _, snap in caught_up), caught_up  # a chain of >= 2 deltas
    # training from the broadcast model still learns the task
    assert server.evaluate()[0] > 0.9


def test_the_broadcast_model_follows_the_global_one_within_the_codec_error():
    torch.manual_seed(0)
    g = {"w": torch.randn(6, 5), "b": torch.randn(6), "n": torch.tensor(3)}
    bc = DeltaBroadcast(4, ["a"])
    bc.prepare(g, 0)
    _assert_same(bc.state, g)  # first round: an exact copy (a snapshot)
    for r in range(1, 6):
        prev = {k: v.clone() for k, v in bc.state.items()}
        g = {"w": g["w"] + 0.3 * torch.randn(6, 5), "b": g["b"] + 0.1 * torch.randn(6),
             "n": g["n"]}
        bc.prepare(g, r)
        d = g["w"].double() - prev["w"].double()  # what had to travel, error fed back
        step = d.abs().amax(1, keepdim=True) / 7
        assert ((bc.state["w"].double() - g["w"].double()).abs()
                <= step / 2 * (1 + 1e-5) + 1e-6).all()
        db = g["b"].double() - prev["b"].double()
        assert ((bc.state["b"].double() - g["b"].double()).abs()
                <= db.abs() * 2.0 ** -8 + 1e-6).all()  # bfloat16: 2^-9 relative, rounded
        assert torch.equal(bc.state["n"], g["n"])
    # nothing new: the residual alone travels and the model gets closer
    before = (bc.state["w"] - g["w"]).abs().max()
    bc.prepare(g, 6)
    assert (bc.state["w"] - g["w"]).abs().max() <= before


def test_a_client_that_missed_rounds_gets_the_smaller_of_chain_and_snapshot():
    torch.manual_seed(1)
    g = {"w": torch.randn(32, 64), "b": torch.randn(32)}
    template = {k: torch.zeros_like(v) for k, v in g.items()}
    bc = DeltaBroadcast(4, ["old", "recent", "fresh"])
    bc.prepare(g, 0)
    bc.settle("old", "received")
    recent = HeldModel()
    for r in range(1, 16):
        g = {k: v + 0.05 * torch.randn_like(v) for k, v in g.items()}
        bc.prepare(g, r)
        if r == 14:
            recent.receive(bc.blob_for("recent")[0], template)
            bc.settle("recent", "received")
    snapshot, kind = bc.blob_for("fresh")
    assert kind == "snapshot"
    chain, kind = bc.blob_for("recent")
    assert kind == "chain" and len(chain) < len(snapshot)
    old, kind = bc.blob_for("old")  # 15 int4 deltas weigh more than one float32 copy
    assert kind == "snapshot" and old == snapshot
    fresh = HeldModel()
    fresh.receive(snapshot, template)
    recent.receive(chain, template)
    for held in (fresh, recent):
        _assert_same(held.state, bc.state)
        assert held.version == bc.version == 15


def test_a_client_whose_reply_got_lost_skips_what_it_applied():
    g = {"w": torch.randn(4, 3)}
    bc = DeltaBroadcast(8, ["a"])
    bc.prepare(g, 0)
    held = HeldModel()
    held.receive(bc.blob_for("a")[0], g)
    bc.settle("a", "received")
    bc.prepare({"w": g["w"] + 1}, 1)
    held.receive(bc.blob_for("a")[0], g)          # it got version 1 ...
    bc.settle("a", "unchanged")                   # ... but the server never heard back
    bc.prepare({"w": g["w"] + 2}, 2)
    blob, kind = bc.blob_for("a")                 # chain 1..2 from version 0
    assert kind == "chain"
    held.receive(blob, g)
    _assert_same(held.state, bc.state)


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("with_template", [False, True])
def test_state_dict_round_trips_and_resume_continues_bit_identically(tmp_path, with_template):
    template = _template(_mlp) if with_template else None
    straight = _server(template=template)
    straight.fit(5)
    first = _server(template=template)
    first.fit(3, checkpoint_dir=tmp_path)
    resumed = _server(template=template)
    resumed.fit(5, checkpoint_dir=tmp_path, resume=True)
    _assert_same(resumed.model.state_dict(), straight.model.state_dict())
    _assert_same(resumed.broadcast.state, straight.broadcast.state)
    assert resumed.broadcast.held == straight.broadcast.held
    assert resumed.broadcast.history == straight.broadcast.history
    assert resumed.broadcast.base == straight.broadcast.base
    assert (resumed.broadcast.base is not None) == with_template
    for a, b in zip(resumed.clients, straight.clients):
        assert a.held.version == b.held.version
        if b.held.state is not None:  # read back from the checkpoint: names sorted
            _assert_same(a.held.state, b.held.state, ordered=False)


def test_held_model_state_dict_round_trip():
    server = _server()
    server.run_round(0)
    c = next(c for c in server.clients if c.held.state is not None)
    other = HeldModel()
    other.load_state_dict(c.held.state_dict())
    assert other.version == c.held.version and other.digest == c.held.digest
    _assert_same(other.state, c.held.state)
    with pytest.raises(ValueError, match="held model state expected"):
        other.load_state_dict({"bogus": torch.zeros(1)})


def test_apply_delta_is_the_float32_sum_of_the_decoded_delta():
    from oqfl_ext.fl import decode_update, encode_update

    state = {"w": torch.randn(5, 4), "v": torch.randn(5).half(), "n": torch.tensor(7)}
    blob = encode_update({"w": torch.randn(5, 4), "v": torch.randn(5)}, bits=4,
                         stochastic=False, compression="none")
    d = decode_update(blob, {"w": state["w"], "v": state["v"]}, compression="none")
    out = apply_delta(state, blob)
    assert torch.equal(out["w"], state["w"] + d["w"])
    assert torch.equal(out["v"], (state["v"].float() + d["v"]).half())
    assert out["n"] is state["n"]


# ------------------------------------------------------------------------------ refusals

def _one_client_blobs():
    g = {"w": torch.randn(4, 6), "b": torch.randn(4), "n": torch.tensor(2)}
    bc = DeltaBroadcast(4, ["a"])
    bc.prepare(g, 0)
    snapshot = bc.blob_for("a")[0]
    held = HeldModel()
    held.receive(snapshot, g)
    bc.settle("a", "received")
    bc.prepare({**g, "w": g["w"] + 0.5}, 1)
    return g, bc, held, snapshot, bc.blob_for("a")[0]


def _refuses_every_corruption(held, blob, template):
    """Every single-byte change and every 7th truncation of ``blob`` is refused."""
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x41
        with pytest.raises(UpdateRejected, match="downlink rejected"):
            held.receive(bytes(bad), template)
    for n in range(0, len(blob), 7):
        with pytest.raises(UpdateRejected, match="downlink rejected"):
            held.receive(blob[:n], template)


def test_every_corruption_is_refused_and_leaves_the_model():
    g, bc, held, snapshot, delta = _one_client_blobs()
    before = {k: v.clone() for k, v in held.state.items()}
    for blob in (delta, snapshot):
        _refuses_every_corruption(held, blob, g)
    _assert_same(held.state, before)
    assert held.version == 0


def test_a_blob_for_another_model_or_another_base_is_refused():
    g, bc, held, snapshot, delta = _one_client_blobs()
    other = {"w": torch.zeros(4, 7), "b": torch.zeros(4), "n": torch.tensor(2)}
    with pytest.raises(UpdateRejected, match="another model"):
        HeldModel().receive(snapshot, other)
    with pytest.raises(UpdateRejected, match="holds no model yet: it needs a snapshot"):
        HeldModel().receive(delta, g)
    stranger = HeldModel()
    stranger.load_state_dict({"version": torch.tensor(0),
                              **{f"model.{k}": v + (k == "w") for k, v in g.items()}})
    with pytest.raises(UpdateRejected, match="with other values"):
        stranger.receive(delta, g)
    with pytest.raises(TypeError, match="blob expected bytes"):
        held.receive("text", g)
    held.receive(delta, g)  # the right client still takes it
    _assert_same(held.state, bc.state)


def test_a_decompression_bomb_is_refused_before_it_is_decompressed():
    import zstandard

    g, _, held, _, _ = _one_client_blobs()
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(
        bytes(raw_limit(g) + 1))
    with pytest.raises(UpdateRejected, match="more than the"):
        held.receive(bomb, g)


def test_downlink_argument_errors():
    with pytest.raises(ValueError, match="downlink expected one of"):
        _server("int2-delta")
    with pytest.raises(ValueError, match="keeps state on both sides"):
        downlink_codec("int4-delta")
    with pytest.raises(ValueError, match="bits expected 4 or 8"):
        DeltaBroadcast(2, ["a"])
    server = _server()
    with pytest.raises(ValueError, match="not sampled in an open round"):
        server.downlink_for("c0")


# ------------------------------------------------------------------------------ first contact

def test_first_contact_is_a_sparse_snapshot_and_the_run_is_unchanged():
    template = _template(_quantized_mlp)
    server = _quantized_server([template] * 6, template)
    full = _quantized_server([None] * 6, None)  # the same run with full snapshots
    b0 = server.broadcast
    seen = set()
    for r in range(5):
        res, ref = server.run_round(r), full.run_round(r)
        assert res.sampled == ref.sampled and res.accepted == res.sampled, res.dropped
        new = set(res.sampled) - seen
        assert set(ref.downlink_snapshots) >= new
        assert res.downlink_snapshots == []  # every first contact: sparse snapshot + chain
        if new:
            assert res.downlink_bytes < ref.downlink_bytes
        seen |= new
        for c in server.clients:
            if c.client_id in res.sampled:
                _assert_same(c.held.state, b0.state)
                assert c.held.version == b0.version and c.held.digest == state_digest(b0.state)
        if r == 0:
            # what the server changed before round 1: the calibrated quantizers only
            changed = sorted(k for k in template if not torch.equal(b0.state[k], template[k]))
            assert changed and all("quantizer" in k for k in changed), changed
            assert any(k.endswith("weight_quantizer.step_size") for k in changed)
    assert len(seen) == 6
    # the clients held the same models, so the run is the full-snapshot run, bit for bit
    _assert_same(server.model.state_dict(), full.model.state_dict())
    _assert_same(b0.state, full.broadcast.state)


def test_a_sparse_snapshot_and_chain_are_far_smaller_than_a_full_snapshot():
    torch.manual_seed(2)
    t = {"w": torch.randn(64, 128), "b": torch.randn(64), "s": torch.rand(64),
         "n": torch.tensor(0)}
    g = {**t, "s": 2 * t["s"], "n": torch.tensor(1)}  # what the server changed before round 1
    ids = ["a", "b"]
    sparse_bc, full_bc = DeltaBroadcast(4, ids, t), DeltaBroadcast(4, ids)
    for r in range(3):
        if r:
            g = {**g, "w": g["w"] + 0.05 * torch.randn(64, 128), "b": g["b"] + 0.1}
        sparse_bc.prepare(g, r)
        full_bc.prepare(g, r)
        _assert_same(sparse_bc.state, full_bc.state)
        if r in (0, 2):  # "a" at version 0, "b" at version 2 (a chain of two deltas)
            cid = "a" if r == 0 else "b"
            blob, kind = sparse_bc.blob_for(cid)
            snapshot, full_kind = full_bc.blob_for(cid)
            assert (kind, full_kind) == ("sparse", "snapshot")
            assert parse_blob(blob, t)["kind"] == "sparse"
            # float32 "w" never travels: the changed entries, then int4 deltas
            assert len(blob) < (len(snapshot) / 20 if r == 0 else len(snapshot) / 3), \
                (len(blob), len(snapshot))
            held = HeldModel(t)
            held.receive(blob, t)
            _assert_same(held.state, full_bc.state)
            assert held.version == r and held.digest == sparse_bc.digest
            sparse_bc.settle(cid, "received")
            full_bc.settle(cid, "received")


def test_a_client_with_another_template_refuses_and_then_gets_full_snapshots():
    template = _template(_quantized_mlp)
    other = _template(_quantized_mlp, seed=1)  # another seed: other initial weights
    server = _quantized_server([template, other, None, template], template, fraction=1.0)
    res = server.run_round(0)
    dropped = dict(res.dropped)
    assert sorted(dropped) == ["c1", "c2"], dropped
    assert "sparse snapshot made for another initial template" in dropped["c1"]
    assert "this client has no initial template: it needs a full snapshot" in dropped["c2"]
    for c in server.clients[1:3]:
        assert c.held.version is None  # refused: nothing applied
    assert server.broadcast.no_template == {"c1", "c2"}
    for r in (1, 2):
        res = server.run_round(r)
        assert res.accepted == res.sampled, res.dropped
        # the refusers took a full snapshot (round 1) and then chains
        assert res.downlink_snapshots == (["c1", "c2"] if r == 1 else [])
        for c in server.clients:
            _assert_same(c.held.state, server.broadcast.state)


def test_every_corruption_of_a_sparse_snapshot_is_refused():
    t = {"w": torch.randn(16, 32), "s": torch.rand(16), "n": torch.tensor(0)}
    bc = DeltaBroadcast(4, ["a"], t)
    bc.prepare({**t, "s": 3 * t["s"], "n": torch.tensor(1)}, 0)
    bc.settle("a", "received")
    bc.prepare({**t, "w": t["w"] + 0.5, "s": 3 * t["s"], "n": torch.tensor(1)}, 1)
    bc.held["a"] = None  # the server lost track of "a": sparse snapshot + chain
    blob, kind = bc.blob_for("a")
    assert kind == "sparse"
    held = HeldModel(t)
    _refuses_every_corruption(held, blob, t)
    assert held.version is None and held.state is None
    held.receive(blob, t)
    _assert_same(held.state, bc.state)
    assert held.version == 1
    # the template is not part of the held model's state; a reset keeps it
    held.load_state_dict({})
    assert held.state is None and held.initial_digest == state_digest(t)
