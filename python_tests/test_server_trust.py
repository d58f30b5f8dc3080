"""What the server takes on a client's word, and what it counts as delivered
(oqfl_ext.fl.Server.run_round): a ``num_samples`` claim is capped at what the server assigned,
a step that would leave the global model non-finite is never applied, and ``downlink_bytes``
counts only the clients the global state reached (NotDelivered / DeliveryUnconfirmed). The
references are float64 sums written out here and the downlink codec's own blob length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oqfl_ext.fl import (DeliveryUnconfirmed, NotDelivered, Server, decode_update,
                         downlink_codec, encode_update)
from oqfl_ext.fl.client import float_state
from oqfl_ext.fl.metrics import round_record


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


TEST = (torch.randn(16, 4, generator=torch.Generator().manual_seed(1)),
        torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2)))


class Scripted:
    """A client that sends ``value`` in every floating-point entry, claiming ``claim`` samples
    while the server assigned it ``assigned`` (its ``num_samples``)."""

    def __init__(self, cid, value, claim, assigned=None, fails=None):
        self.client_id, self.value, self.claim, self.fails = cid, value, claim, fails
        if assigned is not None:
            self.num_samples = assigned

    def train(self, global_state, model_fn, *, round_idx=0):
        if self.fails is not None:
            raise self.fails
        update = {k: torch.full_like(v, self.value) for k, v in float_state(global_state).items()}
        return encode_update(update, bits=32, round=round_idx, client_id=self.client_id,
                             num_samples=self.claim, stochastic=False)


def _server(clients, **kw):
    return Server(_model, TEST, clients=clients, seed=0, **kw)


def _float64_step(before, weighted):
    """global + sum_i n_i / sum_j n_j * u_i in float64, per floating-point entry."""
    total = sum(n for _, n in weighted)
    return {k: v.double() + sum(n / total * value for value, n in weighted)
            for k, v in before.items()}


def test_a_num_samples_claim_is_capped_at_the_assigned_count():
    honest, liar = Scripted("a", 0.5, 30, assigned=30), Scripted("b", -1.0, 10**18, assigned=10)
    server = _server([honest, liar])
    before = float_state({k: v.clone() for k, v in server.model.state_dict().items()})
    res = server.run_round(0)
    assert res.accepted == ["a", "b"] and res.capped == ["b"] and res.num_samples == 40
    want = _float64_step(before, [(0.5, 30), (-1.0, 10)])
    got = float_state(server.model.state_dict())
    for k, v in want.items():
        if k.endswith("running_var"):
            v = v.clamp(min=0)
        torch.testing.assert_close(got[k].double(), v, rtol=0, atol=1e-6, msg=k)
    assert round_record(res, downlink_bytes=res.downlink_bytes)["capped"] == ["b"]


def test_a_claim_within_the_assignment_and_unknown_assignments_are_taken_as_sent():
    a, b = Scripted("a", 1.0, 3, assigned=30), Scripted("b", 2.0, 1)  # b: no num_samples
    server = _server([a, b])
    before = float_state({k: v.clone() for k, v in server.model.state_dict().items()})
    res = server.run_round(0)
    assert res.capped == [] and res.num_samples == 4
    got = float_state(server.model.state_dict())
    want = _float64_step(before, [(1.0, 3), (2.0, 1)])
    torch.testing.assert_close(got["0.weight"].double(), want["0.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_that_overflows_the_model_is_never_applied(momentum):
    # finite values near float32's limit: one round makes the weights ~3e38, the next inf
    server = _server([Scripted("big", 3e38, 5, assigned=5)], server_momentum=momentum)
    first = server.run_round(0)
    after_first = {k: v.clone() for k, v in server.model.state_dict().items()}
    assert first.aggregate_rejected is None
    second = server.run_round(1)
    assert second.aggregate_rejected is not None and "non-finite" in second.aggregate_rejected
    state = server.model.state_dict()
    for k, v in after_first.items():  # untouched, bit for bit
        assert torch.equal(state[k], v), k
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    if server.momentum is not None:
        assert all(bool(torch.isfinite(v).all()) for v in server.momentum.values())
    # the downlink (which refuses non-finite values) and the next round still work
    server.run_round(2)
    rec = round_record(second, downlink_bytes=second.downlink_bytes)
    assert "non-finite" in rec["aggregate_rejected"]


def test_downlink_counts_only_clients_the_state_reached():
    clients = [Scripted("ok", 0.1, 5, assigned=5),
               Scripted("crashed", 0.0, 5, fails=RuntimeError("ClientApp raised")),
               Scripted("offline", 0.0, 5, fails=NotDelivered("node not connected")),
               Scripted("silent", 0.0, 5, fails=DeliveryUnconfirmed("no reply"))]
    server = _server(clients)
    state = {k: v.detach() for k, v in server.model.state_dict().items()}
    blob_len = len(downlink_codec("float32").encode(state, 0))  # the codec's own blob
    res = server.run_round(0)
    assert res.sampled == ["ok", "crashed", "offline", "silent"]
    assert res.accepted == ["ok"]
    assert res.not_delivered == ["offline"] and res.unconfirmed == ["silent"]
    assert res.downlink_bytes == 2 * blob_len  # "ok" and "crashed" had the state
    assert res.downlink_unconfirmed_bytes == blob_len
    reasons = dict(res.dropped)
    assert "not delivered" in reasons["offline"] and "unconfirmed" in reasons["silent"]
    rec = round_record(res, downlink_bytes=res.downlink_bytes)
    assert rec["not_delivered"] == ["offline"] and rec["unconfirmed"] == ["silent"]
    assert rec["downlink_unconfirmed_bytes"] == blob_len


def test_every_sampled_in_process_client_counts_as_delivered():
    server = _server([Scripted(f"c{i}", 0.01, 2, assigned=2) for i in range(3)])
    state = {k: v.detach() for k, v in server.model.state_dict().items()}
    blob_len = len(downlink_codec("float32").encode(state, 0))
    res = server.run_round(0)
    assert res.downlink_bytes == 3 * blob_len and res.downlink_unconfirmed_bytes == 0
    assert res.not_delivered == [] and res.unconfirmed == []
    # what the server decoded is what the scripted client meant to send
    blob = Scripted("c0", 0.01, 2).train(state, _model, round_idx=0)
    upd = decode_update(blob, float_state(state))
    assert all(torch.equal(v, torch.full_like(v, 0.01)) for v in upd.values())
