"""The Flower ClientApp: trains one OQFL client (:class:`oqfl_ext.fl.Client`) per SuperNode.

The SuperNode's node config names its partition: ``--node-config "partition-id=I
num-partitions=N"`` (N must equal the run's ``num-clients``). On a ``train`` message the app
loads the run's data (the local files), builds client ``c<I>`` on partition I exactly as
:func:`oqfl_ext.fl.flower.task.run_in_process` does, decodes the global state from the message,
trains, and replies with the encoded update blob (message layout: :mod:`.wire`). The client's
state between rounds (``Client.state_dict()``: the error-feedback residual) lives in the node's
``context.state`` (it never leaves the node). On ``query`` it replies with its partition, so
that the ServerApp can map partitions to node ids.

Fault injection (tests): with ``OQFL_FLOWER_HOLD="ROUND:PATH"`` in the SuperNode's
environment, the ClientApp that gets the ``train`` message of round ROUND, once it has decoded
the global state (the message was delivered in full), creates the file PATH and then waits
(at most an hour) instead of training, so that a test can kill the node at exactly that point.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import Experiment, load_data, make_client, make_partitions
from .wire import array_bytes, blob_array, encode_state

__all__ = ["app"]

logger = logging.getLogger("oqfl_ext.fl.flower")

app = ClientApp()


def _partition(context: Context, exp: Experiment) -> int:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("the SuperNode needs --node-config \"partition-id=I num-partitions=N\"")
    pid, n = cfg["partition-id"], cfg["num-partitions"]
    if isinstance(pid, bool) or not isinstance(pid, int) or isinstance(n, bool) \
            or not isinstance(n, int):
        raise ValueError(f"node config partition-id / num-partitions expected integers, got "
                         f"{pid!r} / {n!r}")
    if n != exp.num_clients or not 0 <= pid < n:
        raise ValueError(f"node config partition-id={pid} num-partitions={n} does not fit the "
                         f"run's num-clients={exp.num_clients}")
    return pid


HOLD_ENV = "OQFL_FLOWER_HOLD"


def _hold_if_asked(round_idx: int) -> None:
    """The fault-injection point of the module docstring (``OQFL_FLOWER_HOLD``)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    hold_round, sep, path = spec.partition(":")
    if not sep or not hold_round.isdigit() or not path:
        raise ValueError(f"{HOLD_ENV} expected ROUND:PATH, got {spec!r}")
    if int(hold_round) != round_idx:
        return
    Path(path).write_text(f"round {round_idx} received by pid {os.getpid()}\n")
    logger.warning("oqfl client: %s: holding round %d until killed", HOLD_ENV, round_idx)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        time.sleep(1)
    raise RuntimeError(f"{HOLD_ENV}: held round {round_idx} for an hour without being killed")


@app.query()
def query(msg: Message, context: Context) -> Message:
    exp = Experiment.from_run_config(context.run_config)
    pid = _partition(context, exp)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid,
                                                     "num-partitions": exp.num_clients})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch
    from safetensors.torch import load

    from ..server import downlink_codec

    exp = Experiment.from_run_config(context.run_config)
    exp.apply_threads()
    pid = _partition(context, exp)
    cfg = msg.content["config"]
    round_idx = int(cfg["round"])
    train_data, _ = load_data(exp)
    parts = make_partitions(exp, train_data[1])
    client = make_client(exp, pid, train_data, parts)
    if cfg["client-id"] != client.client_id:
        raise ValueError(f"message for client {cfg['client-id']!r} reached {client.client_id!r}")
    model_fn = exp.model_fn()
    with torch.random.fork_rng(devices=[]):
        template = model_fn().state_dict()
    # what an in-process client gets: the downlink codec's state, every entry (see .wire)
    state = downlink_codec(str(cfg["downlink"])).decode(
        array_bytes(msg.content["global"]["model"]), template)

    _hold_if_asked(round_idx)
    if "oqfl" in context.state:  # the error-feedback residual of the previous round
        client.load_state_dict(load(array_bytes(context.state["oqfl"]["client"])))

    logger.warning("oqfl client %s (partition %d): round %d: training on %d examples",
                   client.client_id, pid, round_idx, len(client))
    blob = client.train(state, model_fn, round_idx=round_idx)

    client_state = client.state_dict()
    if client_state:
        context.state["oqfl"] = ArrayRecord({"client": blob_array(encode_state(client_state))})
    metrics = {"num-examples": len(client), "blob-bytes": len(blob)}
    if client.last_loss is not None:
        metrics["train-loss"] = float(client.last_loss)
    return Message(RecordDict({"update": ArrayRecord({"blob": blob_array(blob)}),
                              "metrics": MetricRecord(metrics)}), reply_to=msg)
