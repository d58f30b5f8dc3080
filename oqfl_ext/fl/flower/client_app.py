"""The Flower ClientApp: trains one OQFL client (:class:`oqfl_ext.fl.Client`) per SuperNode.

The SuperNode's node config names its partition: ``--node-config "partition-id=I
num-partitions=N"`` (N must equal the run's ``clients``). On a ``train`` message the app
loads the run's data (the local files), builds client I on partition I exactly as the
in-process run does (:func:`oqfl_ext.fl.experiment.make_client`), decodes the global state from
the message, trains, and replies with the encoded update blob (message layout: :mod:`.wire`).
The client's state between rounds (``Client.state_dict()``: the error-feedback residual and,
with a delta downlink, the broadcast model it holds, :class:`oqfl_ext.fl.downlink.HeldModel`)
lives in the node's ``context.state`` (it never leaves the node); the held model's initial
template, which a first-contact sparse snapshot applies to, is built from the run config
(:func:`oqfl_ext.fl.experiment.initial_template`), once per process with the rest below. On
``query`` it replies with its partition, so that the ServerApp can map partitions to node ids.

What a message needs besides its own content (the parsed run config; the data, the partitions
and the global model's template) is built once per process and run config (:func:`_setup`),
not per message: in Flower's simulation one process (a Ray actor) serves the messages of
many virtual SuperNodes, each of which would otherwise read and pool the whole data set. The
cached values are only read: a client indexes its own copy of its partition's examples, and
the template is only checked against.

Fault injection (tests): with ``OQFL_FLOWER_HOLD="ROUND:PATH"`` in the SuperNode's
environment, the ClientApp that gets the ``train`` message of round ROUND, once it has decoded
the global state (the message was delivered in full), creates the file PATH and then waits
(at most an hour) instead of training, so that a test can kill the node at exactly that point.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import experiment as ex
from ..._checks import check_int
from ..experiment import ExperimentConfig
from .task import FlowerSettings, apply_threads, parse_run_config
from .wire import array_bytes, blob_array, encode_state

__all__ = ["app"]

logger = logging.getLogger("oqfl_ext.fl.flower")

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse(items: Tuple[Tuple[str, object], ...]) -> Tuple[ExperimentConfig, FlowerSettings]:
    return parse_run_config(dict(items))


def _parsed(run_config: Mapping) -> Tuple[ExperimentConfig, FlowerSettings]:
    """:func:`~.task.parse_run_config`, once per run config and process (a bad run config
    raises each time: lru_cache keeps no exception)."""
    return _parse(tuple(sorted(run_config.items())))


class _Setup(NamedTuple):
    data: ex.ExperimentData
    parts: List  # the partitions' indices (tensors)
    model_fn: Callable
    template: Dict  # the model's state_dict(), to check a downlink blob against
    initial: Optional[Dict]  # the delta downlink's initial template (built once, not per message)


@functools.lru_cache(maxsize=1)  # one run at a time per process: bounds the memory
def _setup(cfg: ExperimentConfig) -> _Setup:
    import torch

    data = ex.load_data(cfg)
    model_fn = ex.model_fn(cfg, *data.model_shape)
    with torch.random.fork_rng(devices=[]):
        template = model_fn().state_dict()
    return _Setup(data, ex.make_partitions(cfg, data.train_y), model_fn, template,
                  ex.initial_template(cfg, *data.model_shape))


def _partition(context: Context, cfg: ExperimentConfig) -> int:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("the SuperNode needs --node-config \"partition-id=I num-partitions=N\"")
    pid = check_int("node config partition-id", node["partition-id"])
    n = check_int("node config num-partitions", node["num-partitions"])
    if n != cfg.clients or not 0 <= pid < n:
        raise ValueError(f"node config partition-id={pid} num-partitions={n} does not fit the "
                         f"run's clients={cfg.clients}")
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
    cfg, _ = _parsed(context.run_config)
    pid = _partition(context, cfg)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid,
                                                     "num-partitions": cfg.clients})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from safetensors.torch import load

    from ..downlink import DELTA_DOWNLINKS
    from ..server import downlink_codec

    cfg, settings = _parsed(context.run_config)
    apply_threads(settings)
    pid = _partition(context, cfg)
    config = msg.content["config"]
    round_idx = int(config["round"])
    setup = _setup(cfg)
    client = ex.make_client(cfg, setup.data, setup.parts, pid, setup.initial)
    if config["client-id"] != client.client_id:
        raise ValueError(f"message for client {config['client-id']!r} reached "
                         f"{client.client_id!r}")
    model_fn, template = setup.model_fn, dict(setup.template)
    if "oqfl" in context.state:  # the residual and held model of the previous rounds
        client.load_state_dict(load(array_bytes(context.state["oqfl"]["client"])))
    blob = array_bytes(msg.content["global"]["model"])
    downlink = str(config["downlink"])
    if downlink in DELTA_DOWNLINKS:  # what an in-process client does (Server.run_round)
        if downlink != cfg.downlink:
            raise ValueError(f"message downlink {downlink!r:.40}, the run config says "
                             f"{cfg.downlink!r}")
        state = client.held.receive(blob, template)
    else:  # what an in-process client gets: the codec's state, every entry (see .wire)
        state = downlink_codec(downlink).decode(blob, template)

    _hold_if_asked(round_idx)

    logger.warning("oqfl client %s (partition %d): round %d: training on %d examples",
                   client.client_id, pid, round_idx, len(client))
    limit = cfg.client_time_limit_s  # past it the client stops: a ClientApp error
    blob = client.train(state, model_fn, round_idx=round_idx,
                        deadline=None if limit is None else time.monotonic() + limit)

    client_state = client.state_dict()
    if client_state:
        context.state["oqfl"] = ArrayRecord({"client": blob_array(encode_state(client_state))})
    metrics = {"num-examples": len(client), "blob-bytes": len(blob)}
    if client.last_loss is not None:
        metrics["train-loss"] = float(client.last_loss)
    return Message(RecordDict({"update": ArrayRecord({"blob": blob_array(blob)}),
                              "metrics": MetricRecord(metrics)}), reply_to=msg)
