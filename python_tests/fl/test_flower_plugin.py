"""OQFL inside any Flower app: the client-side mod (oqfl_ext.fl.flower.mod) and the FedAvg-compatible
strategy (oqfl_ext.fl.flower.strategy), on Flower messages built here (no processes: the
deployment-engine run of a user's app is test_flower_user_app.py).

References are independent of the code under test: float64 deltas and weighted averages computed
here, the codec's documented error bound (a per-output-channel step ``max|slice| / qmax``, error
at most half a step with round half to even, below one step with stochastic rounding; bfloat16
for vectors), and the codec's own decoder only to read what a blob carries.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if os.environ.get("OQFL_REQUIRE_FLOWER") == "1":
    import flwr  # noqa: F401
pytest.importorskip("flwr", reason="flwr is not installed (pip install '.[flower]')")

from flwr.app import (ArrayRecord, ConfigRecord, Context, Error, Message,  # noqa: E402
                      MessageType, MetricRecord, RecordDict)
from flwr.common.constant import ErrorCode  # noqa: E402

from oqfl_ext.fl.codec import decode_update, encode_update  # noqa: E402
from oqfl_ext.fl.flower.mod import STATE_KEY, UPDATE_ARRAY, OQFLMod  # noqa: E402
from oqfl_ext.fl.flower.strategy import OQFLFedAvg  # noqa: E402
from oqfl_ext.fl.flower.wire import array_bytes, blob_array  # noqa: E402

QMAX = {4: 7, 8: 127}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are built as in a ServerApp process, which Flower tells who it is."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _model_state(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(7)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


def _delta(state, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(state[k].shape, generator=gen) * scale for k in _float_keys(state)}


def _context(node_id):
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def _train_msg(state, node_id, server_round=1):
    content = RecordDict({"arrays": ArrayRecord(state),
                          "config": ConfigRecord({"server-round": server_round, "lr": 0.1})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def _client_app(delta, num_examples=100, arrays_key="arrays", extra_metrics=None):
    """A ClientApp's train function: replies ``global + delta`` (float arrays; the others as
    received) with ``num-examples``."""
    def call_next(msg, context):
        local = dict(msg.content["arrays"].to_torch_state_dict())
        for k, d in delta.items():
            local[k] = local[k] + d
        metrics = {"num-examples": num_examples, "train-loss": 0.5, **(extra_metrics or {})}
        return Message(RecordDict({arrays_key: ArrayRecord(local),
                                   "metrics": MetricRecord(metrics)}), reply_to=msg)
    return call_next


def _blob(reply):
    (record,) = reply.content.array_records.values()
    assert list(record) == [UPDATE_ARRAY]
    return array_bytes(record[UPDATE_ARRAY])


def _step_bound(x, bits, stochastic):
    """Per-element error bound of the codec for a tensor (float64)."""
    x = x.double()
    if x.dim() >= 2:
        step = x.reshape(x.shape[0], -1).abs().amax(1) / QMAX[bits]
        step = step.clamp_min(torch.finfo(torch.float32).tiny)
        bound = step if stochastic else step / 2
        return bound.view(-1, *([1] * (x.dim() - 1))).expand_as(x) * (1 + 1e-6) + 1e-12
    return x.abs() * 2.0 ** -8 + 1e-30  # bfloat16, round to nearest: 2^-9 relative


# ----------------------------------------------------------------------------------------------
# the mod


@pytest.mark.parametrize("bits,stochastic", [(8, False), (4, False), (4, True), (32, False)])
def test_mod_sends_the_update_within_the_codecs_error(bits, stochastic):
    state = _model_state()
    delta = _delta(state, 1)
    mod = OQFLMod(bits=bits, stochastic=stochastic, error_feedback=False)
    msg = _train_msg(state, node_id=42, server_round=3)
    reply = mod(msg, _context(42), _client_app(delta, num_examples=123))
    assert not reply.has_error()
    assert reply.content["metrics"]["num-examples"] == 123  # the user's metrics go through
    template = {k: state[k] for k in _float_keys(state)}
    got, info = decode_update(_blob(reply), template, return_info=True)
    assert (info["round"], info["client_id"], info["num_samples"], info["bits"]) == \
        (3, "42", 123, bits)
    assert "1.num_batches_tracked" not in got  # not floating point: never sent
    for k, d in delta.items():
        # what the mod saw: (global + delta) - global in float32
        sent = (state[k] + d).double() - state[k].double()
        err = (got[k].double() - sent).abs()
        if bits == 32:
            assert torch.equal(got[k], ((state[k] + d) - state[k])), k
        else:
            assert bool((err <= _step_bound(sent, bits, stochastic)).all()), (k, err.max())


def test_mod_error_feedback_carries_the_residual_to_the_next_round():
    state = _model_state()
    delta = _delta(state, 2)
    mod = OQFLMod(bits=4, stochastic=True, error_feedback=True)
    ctx = _context(7)
    template = {k: state[k] for k in _float_keys(state)}
    sent_total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
    residual = None
    for r in (1, 2, 3):
        reply = mod(_train_msg(state, 7, r), ctx, _client_app(delta))
        got = decode_update(_blob(reply), template)
        new_residual = dict(ctx.state[STATE_KEY].to_torch_state_dict())
        for k in template:
            want = (state[k] + delta[k]) - state[k]
            carried = want.double() + (0 if residual is None else residual[k].double())
            # residual = (delta + previous residual) - what the blob carried
            torch.testing.assert_close(new_residual[k].double(), carried - got[k].double(),
                                       rtol=0, atol=1e-6)
            sent_total[k] += got[k].double()
        residual = new_residual
    # what arrived over three rounds is three deltas minus the last residual
    for k in template:
        want = 3 * ((state[k] + delta[k]) - state[k]).double() - residual[k].double()
        torch.testing.assert_close(sent_total[k], want, rtol=0, atol=1e-5)


def test_mod_leaves_other_messages_alone():
    state = _model_state()
    msg = Message(RecordDict({"arrays": ArrayRecord(state)}), dst_node_id=3,
                  message_type=MessageType.EVALUATE)
    seen = []

    def evaluate(m, context):
        seen.append(m)
        return Message(RecordDict({"metrics": MetricRecord({"acc": 0.5})}), reply_to=m)

    reply = OQFLMod()(msg, _context(3), evaluate)
    assert seen == [msg] and reply.content["metrics"]["acc"] == 0.5


@pytest.mark.parametrize("case,match", [
    ("no-round", "server-round"),
    ("renamed", "differ in names or shapes"),
    ("no-weight", "num-examples"),
    ("two-records", "exactly one ArrayRecord"),
])
def test_mod_refuses_what_it_cannot_encode_with_a_reason(case, match):
    state = _model_state()
    delta = _delta(state, 3)
    msg = _train_msg(state, 5)
    call_next = _client_app(delta)
    if case == "no-round":
        msg = Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({})}),
                      dst_node_id=5, message_type=MessageType.TRAIN)
    elif case == "renamed":
        def call_next(m, context):
            local = {("x" + k): v for k, v in m.content["arrays"].to_torch_state_dict().items()}
            return Message(RecordDict({"arrays": ArrayRecord(local), "metrics":
                                       MetricRecord({"num-examples": 3})}), reply_to=m)
    elif case == "no-weight":
        def call_next(m, context):
            return Message(RecordDict({"arrays": m.content["arrays"],
                                       "metrics": MetricRecord({"loss": 1.0})}), reply_to=m)
    else:
        msg = Message(RecordDict({"arrays": ArrayRecord(state), "more": ArrayRecord(state),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=5, message_type=MessageType.TRAIN)
    reply = OQFLMod()(msg, _context(5), call_next)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert match in reply.error.reason


def test_mod_arguments_are_checked():
    with pytest.raises(ValueError, match="bits"):
        OQFLMod(bits=3)
    with pytest.raises(ValueError, match="compression"):
        OQFLMod(compression="gzip")
    with pytest.raises(ValueError, match="seed"):
        OQFLMod(seed="x")


# ----------------------------------------------------------------------------------------------
# the strategy


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(**kwargs):
    # FedAvg waits (sleeping) until min_available_nodes are connected: the fake grid has them
    kwargs.setdefault("min_available_nodes", 1)
    kwargs.setdefault("min_train_nodes", 1)
    return OQFLFedAvg(**kwargs)


def _round(strategy, state, server_round, clients, *, bits=32, stochastic=False):
    """configure_train with ``state``, then each client (node_id, delta, num_examples) replies
    through the mod; returns the replies' messages."""
    nodes = [c[0] for c in clients]
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        server_round, ArrayRecord(state), ConfigRecord(), _Grid(nodes))}
    assert sorted(msgs) == sorted(nodes)
    mod = OQFLMod(bits=bits, stochastic=stochastic, error_feedback=False)
    return [mod(msgs[node], _context(node), _client_app(delta, n)) for node, delta, n in clients]


def _arrays(record):
    return dict(record.to_torch_state_dict())


def test_strategy_averages_float32_updates_by_num_examples():
    state = _model_state()
    clients = [(11, _delta(state, 11), 30), (12, _delta(state, 12), 90), (13, _delta(state, 13), 0)]
    strategy = _strategy(min_available_nodes=3, min_train_nodes=3)
    replies = _round(strategy, state, 1, clients)
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = _arrays(arrays)
    assert list(new) == list(state)
    for k, v in state.items():
        if not v.is_floating_point():
            assert torch.equal(new[k], v), k  # kept as the server has it
            continue
        sent = [((v + d[k]) - v).double() for _, d, _ in clients]
        want = v.double() + (30 * sent[0] + 90 * sent[1] + 0 * sent[2]) / 120
        torch.testing.assert_close(new[k].double(), want, rtol=0, atol=1e-6)
    report = strategy.last_round
    assert report.accepted == [11, 12, 13] and report.dropped == [] and report.capped == []
    assert metrics["oqfl-accepted"] == 3 and metrics["oqfl-dropped"] == 0
    assert metrics["oqfl-uplink-bytes"] == sum(len(_blob(r)) for r in replies)
    assert metrics["train-loss"] == pytest.approx(0.5)


def test_strategy_int4_aggregate_is_within_the_codecs_error():
    state = _model_state()
    clients = [(21, _delta(state, 21), 50), (22, _delta(state, 22), 150)]
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, _round(strategy, state, 1, clients, bits=4,
                                                   stochastic=True))
    new = _arrays(arrays)
    for k in _float_keys(state):
        sent = [((state[k] + d[k]) - state[k]).double() for _, d, _ in clients]
        want = state[k].double() + (50 * sent[0] + 150 * sent[1]) / 200
        bound = (50 * _step_bound(sent[0], 4, True) + 150 * _step_bound(sent[1], 4, True)) / 200
        assert bool(((new[k].double() - want).abs() <= bound + 1e-6).all()), k


def _corrupt(reply):
    blob = bytearray(_blob(reply))
    blob[-1] ^= 0x10  # a byte of tensor data
    key = next(iter(reply.content.array_records))
    reply.content.array_records[key] = ArrayRecord({UPDATE_ARRAY: blob_array(bytes(blob))})
    return reply


def test_strategy_drops_bad_replies_with_reasons_and_caps_claims():
    state = _model_state()
    good = (31, _delta(state, 31), 40)
    claims_too_much = (32, _delta(state, 32), 10_000)
    strategy = _strategy(max_num_examples=lambda node: 60 if node == 32 else None)
    replies = _round(strategy, state, 2, [good, claims_too_much])

    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        2, ArrayRecord(state), ConfigRecord(), _Grid([33, 34, 35, 36, 37, 38]))}
    mod = OQFLMod(bits=4, error_feedback=False)
    d = _delta(state, 33)
    bad = {
        # a flipped bit in the blob
        33: _corrupt(mod(msgs[33], _context(33), _client_app(d))),
        # a blob made for another round
        34: mod(_train_msg(state, 34, server_round=1), _context(34), _client_app(d)),
        # a blob that names another client than the node that sent it
        35: mod(msgs[35], _context(99), _client_app(d)),
        # a ClientApp without the mod: plain arrays
        36: _client_app(d)(msgs[36], _context(36)),
        # the ClientApp failed
        37: Message(Error(code=0, reason="out of memory"), reply_to=msgs[37]),
        # metrics that disagree with the blob's weight (changed after the mod wrote the blob)
        38: mod(msgs[38], _context(38), _client_app(d, num_examples=5)),
    }
    bad[38].content["metrics"]["num-examples"] = 500
    arrays, metrics = strategy.aggregate_train(2, replies + list(bad.values()))
    report = strategy.last_round
    assert report.accepted == [31, 32]
    reasons = dict(report.dropped)
    assert sorted(reasons) == [33, 34, 35, 36, 37, 38]
    assert "digest mismatch" in reasons[33]
    assert "round 1, expected 2" in reasons[34]
    assert "client_id '99', expected '35'" in reasons[35]
    assert "oqfl_mod" in reasons[36]
    assert "out of memory" in reasons[37]
    assert "num-examples 500 differs from the blob's 5" in reasons[38]
    assert report.capped == [32] and metrics["oqfl-dropped"] == 6
    # the weights: 40 and the capped 60, never the claimed 10000
    new = _arrays(arrays)
    for k in _float_keys(state):
        sent = [((state[k] + c[1][k]) - state[k]).double() for c in (good, claims_too_much)]
        want = state[k].double() + (40 * sent[0] + 60 * sent[1]) / 100
        torch.testing.assert_close(new[k].double(), want, rtol=0, atol=1e-6)


def test_strategy_clips_to_the_norm_bound():
    state = _model_state()
    delta = {k: torch.full_like(v, 1.0) for k, v in _delta(state, 41).items()}
    strategy = _strategy(norm_bound=0.5)
    arrays, _ = strategy.aggregate_train(1, _round(strategy, state, 1, [(41, delta, 10)]))
    new = _arrays(arrays)
    step = torch.cat([(new[k].double() - state[k].double()).flatten()
                      for k in _float_keys(state)])
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-5)
    assert strategy.last_round.clipped == [41]


def test_strategy_refuses_a_non_finite_step_and_an_unknown_round():
    state = {k: v.clone().fill_(3e38) if v.is_floating_point() else v
             for k, v in _model_state().items()}
    strategy = _strategy()
    (msg,) = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), _Grid([51]))
    # a client that sends its own blob (no mod): finite values that overflow the model
    huge = {k: torch.full_like(state[k], 3e38) for k in _float_keys(state)}
    blob = encode_update(huge, bits=32, round=1, client_id="51", num_samples=10)
    reply = Message(RecordDict({"arrays": ArrayRecord({UPDATE_ARRAY: blob_array(blob)}),
                                "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)
    arrays, metrics = strategy.aggregate_train(1, [reply])
    assert arrays is None and "non-finite" in strategy.last_round.step_rejected
    assert metrics["oqfl-accepted"] == 1
    with pytest.raises(RuntimeError, match="without configure_train"):
        strategy.aggregate_train(5, [])


def test_mod_refuses_a_diverged_model():
    state = _model_state()
    delta = {k: torch.full_like(v, float("nan")) for k, v in _delta(state, 52).items()}
    reply = OQFLMod()(_train_msg(state, 52), _context(52), _client_app(delta))
    assert reply.has_error() and "non-finite" in reply.error.reason


def test_strategy_arguments_are_checked():
    for kwargs, match in (({"max_num_examples": -1}, "max_num_examples"),
                          ({"norm_bound": 0}, "norm_bound"),
                          ({"compression": "gzip"}, "compression")):
        with pytest.raises(ValueError, match=match):
            OQFLFedAvg(**kwargs)
