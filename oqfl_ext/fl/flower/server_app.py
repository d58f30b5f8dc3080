"""The Flower ServerApp: the OQFL federation of :class:`oqfl_ext.fl.Server`, over Flower messages.

Round ``t``:

1. the :class:`oqfl_ext.fl.Server` samples clients exactly as in process
   (:meth:`Server.sample_clients`); client ``c<I>`` is the SuperNode whose node config says
   ``partition-id=I`` (learned once, at the start, with a ``query`` message to every node);
2. every sampled client's node gets a ``train`` message with the global state as the
   Server's downlink codec encodes it (layout: :mod:`.wire`), through
   ``grid.send_and_receive(..., timeout=round-timeout)``; a sampled partition whose node is
   not connected is not sent anything;
3. each reply's blob is handed to :meth:`Server.run_round` through a mailbox standing in for
   the client, so that decoding, the round/client-id checks, clipping, FedAvg(M) and the
   evaluation are the in-process server's own code; a node that did not answer within the
   timeout, or answered with an error, is a dropped client (reason in metrics.json);
4. one record per round (:func:`oqfl_ext.fl.metrics.round_record`, plus ``train_loss`` and
   ``clients``: per answering client its node id, blob length and SHA-256) is written with
   :func:`oqfl_ext.fl.metrics.save_run` (``metrics.json``, ``accuracy.png`` in ``out-dir``)
   after every round, and at the end the global ``state_dict`` (``model.safetensors``,
   :func:`.wire.encode_state`).

Bytes: ``uplink_bytes`` is the sum of the lengths of the update blobs received (as in
process); ``downlink_bytes`` the length of the downlink codec's blob times the number of
sampled clients (as in process: :attr:`oqfl_ext.fl.RoundResult.downlink_bytes`). Flower adds
its own message framing (protobuf, chunk headers) on top of both: ``flwr ls --format json``
reports the run's total network traffic.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import NO_PHONE_HOME
from ..metrics import round_record, save_run
from .task import (Experiment, client_id, default_out_dir, load_data, make_partitions,
                   make_server)
from .wire import array_bytes, blob_array, encode_state, sha256

__all__ = ["app"]

logger = logging.getLogger("oqfl_ext.fl.flower")

app = ServerApp()


class _Mailbox:
    """Stands in for a remote client in :meth:`Server.run_round`: ``train`` returns the blob
    the node sent this round, or raises what went wrong (the Server then drops the client)."""

    def __init__(self, cid: str):
        self.client_id = cid
        self.reply: Optional[Union[bytes, BaseException]] = None

    def train(self, global_state, model_fn, *, round_idx: int = 0) -> bytes:
        reply, self.reply = self.reply, None
        if reply is None:
            raise RuntimeError("no reply")
        if isinstance(reply, BaseException):
            raise reply
        return reply


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> List[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def _map_partitions(grid: Grid, nodes: List[int], exp: Experiment) -> Dict[int, int]:
    """partition-id -> node id, from a ``query`` to every node."""
    msgs = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY,
                    group_id="query", ttl=exp.wait_nodes_timeout) for node in nodes]
    mapping: Dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=exp.wait_nodes_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d: query failed: %s", node, reply.error.reason)
            continue
        cfg = reply.content["node"]
        pid, n = int(cfg["partition-id"]), int(cfg["num-partitions"])
        if n != exp.num_clients or not 0 <= pid < n:
            logger.warning("node %d: partition %d of %d does not fit num-clients=%d; ignored",
                           node, pid, n, exp.num_clients)
        elif pid in mapping:
            logger.warning("node %d: partition %d is already node %d's; ignored", node, pid,
                           mapping[pid])
        else:
            mapping[pid] = node
    return mapping


@app.main()
def main(grid: Grid, context: Context) -> None:
    import flwr

    exp = Experiment.from_run_config(context.run_config)
    exp.apply_threads()
    run_id = int(context.run_id)
    out = Path(exp.out_dir) if exp.out_dir else default_out_dir(run_id)
    out.mkdir(parents=True, exist_ok=True)

    train, test = load_data(exp)
    parts = make_partitions(exp, train[1])
    mailboxes = [_Mailbox(client_id(i)) for i in range(exp.num_clients)]
    server = make_server(exp, mailboxes, train, parts, test)

    nodes = _wait_for_nodes(grid, exp.num_clients, exp.wait_nodes_timeout)
    mapping = _map_partitions(grid, nodes, exp)
    if not mapping:
        raise RuntimeError(f"no SuperNode with a partition of this run answered within "
                           f"{exp.wait_nodes_timeout:g} s (nodes: {nodes})")
    missing = sorted(set(range(exp.num_clients)) - set(mapping))
    if missing:
        logger.warning("partitions %s have no node: those clients are dropped", missing)
    logger.warning("oqfl run %d: partitions -> nodes %s", run_id, mapping)

    config = dict(exp.to_dict(), engine="flower", flwr_version=flwr.__version__, run_id=run_id,
                  nodes={str(p): n for p, n in sorted(mapping.items())},
                  flwr_env={k: os.environ.get(k) for k in NO_PHONE_HOME})
    if any(os.environ.get(k) != v for k, v in NO_PHONE_HOME.items()):
        logger.warning("this ServerApp runs without %s: Flower may contact its servers",
                       NO_PHONE_HOME)
    config["out-dir"] = str(out)
    rows: List[dict] = []
    for r in range(exp.num_rounds):
        t0 = time.perf_counter()
        sampled = server.sample_clients(r)
        # what the in-process Server sends: its downlink codec's blob, every state entry
        server_state = {k: v.detach() for k, v in server.model.state_dict().items()}
        model_blob = server.downlink.encode(server_state, r)
        alive = set(grid.get_node_ids())
        msgs, by_node = [], {}
        for box in sampled:
            pid = int(box.client_id[1:])
            node = mapping.get(pid)
            if node is None or node not in alive:
                box.reply = RuntimeError("node not connected")
                continue
            content = RecordDict({
                "global": ArrayRecord({"model": blob_array(model_blob)}),
                "config": ConfigRecord({"round": r, "client-id": box.client_id,
                                        "downlink": server.downlink_name})})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(r), ttl=exp.round_timeout))
            by_node[node] = box
            box.reply = TimeoutError(f"no reply within the round timeout "
                                     f"({exp.round_timeout:g} s)")
        logger.warning("oqfl round %d: sent the global model (%d bytes) to nodes %s", r,
                       len(model_blob), sorted(by_node))
        clients: Dict[str, dict] = {}
        for reply in grid.send_and_receive(msgs, timeout=exp.round_timeout):
            box = by_node.get(reply.metadata.src_node_id)
            if box is None:
                continue
            if reply.has_error():
                box.reply = RuntimeError(f"ClientApp error {reply.error.code}: "
                                         f"{reply.error.reason}")
                continue
            try:
                blob = array_bytes(reply.content["update"]["blob"])
            except Exception as e:  # a malformed reply is a dropped client
                box.reply = e
                continue
            box.reply = blob
            m = reply.content["metrics"] if "metrics" in reply.content else {}
            clients[box.client_id] = {"node_id": reply.metadata.src_node_id,
                                      "blob_bytes": len(blob), "sha256": sha256(blob),
                                      "num_examples": m.get("num-examples"),
                                      "train_loss": m.get("train-loss")}
        res = server.run_round(r)  # decode, checks, clipping, FedAvg(M), evaluation
        res = dataclasses.replace(res, wall_time_s=time.perf_counter() - t0)
        losses = [(c["train_loss"], c["num_examples"]) for cid, c in clients.items()
                  if cid in res.accepted and c["train_loss"] is not None and c["num_examples"]]
        train_loss = (sum(l * n for l, n in losses) / sum(n for _, n in losses)
                      if losses else None)
        rows.append(round_record(res, downlink_bytes=len(model_blob) * len(sampled),
                                 train_loss=train_loss, clients=clients))
        logger.warning("oqfl round %d: accuracy %.4f loss %.4f, accepted %s, dropped %s", r,
                       res.accuracy, res.loss, res.accepted, [c for c, _ in res.dropped])
        save_run(out, config, rows)
    (out / "model.safetensors").write_bytes(encode_state(server.model.state_dict()))
