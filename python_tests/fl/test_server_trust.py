"""What the server takes on a client's word, and what it counts as delivered
(oqfl_ext.fl.Server.run_round): a ``num_samples`` claim is capped at what the server assigned,
a step that would leave the global model non-finite is never applied, and ``downlink_bytes``
counts only the clients the global state reached (NotDelivered / DeliveryUnconfirmed); a round
driven by hand through begin_round / end_round is run_round's round, and end_round refuses
replies it cannot place. The references are float64 sums written out here, the downlink codec's
own blob length and run_round's result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oqfl_ext.fl import (DeliveryUnconfirmed, Dropped, NotDelivered, Server, decode_update,
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


# ----------------------------------------------------------------------------------------------
# one round loop: begin_round / end_round with the transport outside it


def _result_fields(res):
    """A RoundResult without its wall time (the only field that depends on the clock)."""
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(res).items() if k != "wall_time_s"}


def _hand_clients():
    return [Scripted(f"c{i}", 0.05 * (i + 1), 4 + i, assigned=4 + i) for i in range(4)] + \
        [Scripted("liar", -0.2, 10**9, assigned=3),
         Scripted("crashed", 0.0, 1, fails=RuntimeError("device lost"))]


def test_a_round_driven_by_hand_equals_run_round():
    kw = dict(fraction=0.7, server_momentum=0.5, norm_bound=1.0, downlink="int8")
    auto, by_hand = _server(_hand_clients(), **kw), _server(_hand_clients(), **kw)
    for r in range(3):
        want = auto.run_round(r)
        sampled, blob = by_hand.begin_round(r)
        # the transport: what run_round's in-process clients do, written out here
        received = downlink_codec("int8").decode(blob, by_hand.model.state_dict())
        replies = {}
        for c in sampled:
            try:
                replies[c.client_id] = c.train({k: v.clone() for k, v in received.items()},
                                               by_hand.model_fn, round_idx=r)
            except RuntimeError as e:
                replies[c.client_id] = e
        got = by_hand.end_round(r, replies)
        assert len(sampled) == 4  # round(0.7 * 6): the sampling is exercised
        assert _result_fields(got) == _result_fields(want)
        assert got.downlink_bytes == len(blob) * len(sampled)
        a, b = auto.model.state_dict(), by_hand.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert auto.round == by_hand.round == 3


def test_a_reply_from_a_client_not_sampled_is_refused():
    server = _server([Scripted(f"c{i}", 0.1, 2, assigned=2) for i in range(4)], fraction=0.5)
    sampled, blob = server.begin_round(0)
    ids = [c.client_id for c in sampled]
    outsider = next(f"c{i}" for i in range(4) if f"c{i}" not in ids)
    state = {k: v.clone() for k, v in server.model.state_dict().items()}
    forged = Scripted(outsider, 9.0, 2).train(state, _model, round_idx=0)
    replies = {c.client_id: c.train(state, _model, round_idx=0) for c in sampled}
    with pytest.raises(ValueError, match=f"not sampled in round 0.*{outsider}"):
        server.end_round(0, dict(replies, **{outsider: forged}))
    after = server.model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # nothing applied
    res = server.end_round(0, replies)  # the round stayed open
    assert res.accepted == ids and server.round == 1


def test_end_round_without_begin_round_errors_clearly():
    server = _server([Scripted("a", 0.1, 2)])
    with pytest.raises(RuntimeError, match=r"end_round\(0\) without begin_round\(0\).*no round"):
        server.end_round(0, {})
    server.begin_round(0)
    with pytest.raises(RuntimeError, match=r"end_round\(1\).*round 0 is open"):
        server.end_round(1, {})
    server.end_round(0, {})
    with pytest.raises(RuntimeError, match="no round is open"):
        server.end_round(0, {})  # a round ends once
    with pytest.raises(TypeError, match="replies expected a mapping"):
        server.begin_round(1)
        server.end_round(1, [b"blob"])


def test_a_sampled_client_without_a_reply_counts_as_unconfirmed():
    server = _server([Scripted("a", 0.1, 2, assigned=2), Scripted("b", 0.1, 2, assigned=2)])
    sampled, blob = server.begin_round(0)
    state = {k: v.clone() for k, v in server.model.state_dict().items()}
    res = server.end_round(0, {"a": sampled[0].train(state, _model, round_idx=0)})
    assert res.accepted == ["a"] and res.unconfirmed == ["b"]
    assert res.downlink_bytes == len(blob) and res.downlink_unconfirmed_bytes == len(blob)
    assert "no reply" in dict(res.dropped)["b"]


def test_a_dropped_reply_keeps_its_reason_and_counts_as_delivered():
    server = _server([Scripted("a", 0.1, 2, assigned=2)])
    _, blob = server.begin_round(0)
    res = server.end_round(0, {"a": Dropped("too slow for this round")})
    assert res.dropped == [("a", "too slow for this round")] and res.accepted == []
    assert res.downlink_bytes == len(blob) and res.unconfirmed == []
