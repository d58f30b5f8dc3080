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
   timeout, or answered with an error, is a dropped client (reason in metrics.json), and so
   is a reply that does not have the layout of :mod:`.wire` (its metrics included): every
   reply is checked before anything of it is used;
4. one record per round (:func:`oqfl_ext.fl.metrics.round_record`, plus ``train_loss`` and
   ``clients``: per answering client its node id, blob length and SHA-256) is written with
   :func:`oqfl_ext.fl.metrics.save_run` (``metrics.json``, ``accuracy.png`` in ``out-dir``)
   after every round, and at the end the global ``state_dict`` (``model.safetensors``,
   :func:`.wire.encode_state`).

Bytes: ``uplink_bytes`` is the sum of the lengths of the update blobs received (as in
process); ``downlink_bytes`` the length of the downlink codec's blob times the number of
sampled clients it is known to have reached: those that replied, with an update or with a
ClientApp error (the same rule as in process, :attr:`oqfl_ext.fl.RoundResult.downlink_bytes`).
A sampled partition whose node is not connected is sent nothing (``not_delivered``); a node
that was sent the model and never answered (round timeout, or Flower's own report that the
node stopped sending heartbeats or that the message expired) may or may not have pulled it:
it is listed in ``unconfirmed`` and its blob counted in ``downlink_unconfirmed_bytes``. So
Flower's count of the bytes it sent lies between ``downlink_bytes`` and ``downlink_bytes +
downlink_unconfirmed_bytes``, plus Flower's own message framing (protobuf, chunk headers):
``flwr ls --format json`` reports the run's total network traffic.

Every reply is the word of a remote party: a query reply whose partition is not an integer in
range, or a train reply whose metrics are not ``num-examples`` an integer in ``[0, the
partition's size]`` and ``train-loss`` a finite number, is ignored (query) or drops the client
(train), with the reason logged; a client's ``num_samples`` claim in its blob is capped at its
partition's size by the Server.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from . import NO_PHONE_HOME
from ..codec import UpdateRejected
from ..metrics import round_record, save_run
from ..server import DeliveryUnconfirmed, NotDelivered
from .task import (Experiment, client_id, default_out_dir, load_data, make_partitions,
                   make_server)
from .wire import array_bytes, blob_array, encode_state, sha256

__all__ = ["app"]

logger = logging.getLogger("oqfl_ext.fl.flower")

app = ServerApp()


#: error codes Flower's SuperLink makes up itself for a message nobody answered: the node may
#: or may not have pulled the message (every other error comes from the node, which had it)
_NO_ANSWER_CODES = {ErrorCode.NODE_UNAVAILABLE: "node unavailable (no heartbeat)",
                    ErrorCode.MESSAGE_UNAVAILABLE: "message expired or removed"}


class _Mailbox:
    """Stands in for a remote client in :meth:`Server.run_round`: ``train`` returns the blob
    the node sent this round, or raises what went wrong (the Server then drops the client).
    ``num_samples`` is the size of the partition the client was assigned (the Server caps
    the client's claim at it)."""

    def __init__(self, cid: str, num_samples: int):
        self.client_id = cid
        self.num_samples = int(num_samples)
        self.reply: Optional[Union[bytes, BaseException]] = None

    def train(self, global_state, model_fn, *, round_idx: int = 0) -> bytes:
        reply, self.reply = self.reply, None
        if reply is None:
            raise RuntimeError("no reply")
        if isinstance(reply, BaseException):
            raise reply
        return reply


def _read_reply(reply: Message, box: _Mailbox):
    """``(blob, client record)`` of a train reply, or raises why the client is dropped:
    :class:`DeliveryUnconfirmed` for an error the SuperLink made up (nobody answered),
    RuntimeError for the ClientApp's own error, UpdateRejected for a malformed reply."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        code, reason = reply.error.code, str(reply.error.reason)[:200]
        if code in _NO_ANSWER_CODES:
            raise DeliveryUnconfirmed(f"{_NO_ANSWER_CODES[code]}: {reason}")
        raise RuntimeError(f"ClientApp error {code}: {reason}")
    try:
        blob = array_bytes(reply.content["update"]["blob"])
        m = reply.content["metrics"] if "metrics" in reply.content else {}
        n, loss = m.get("num-examples"), m.get("train-loss")
    except UpdateRejected:
        raise
    except Exception as e:  # a reply without the layout of .wire
        raise UpdateRejected(f"malformed reply ({type(e).__name__}: {str(e)[:200]})") from None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                          or not 0 <= n <= box.num_samples):
        raise UpdateRejected(f"reply metrics: num-examples expected an integer in [0, "
                             f"{box.num_samples}], got {n!r:.40}")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))
                             or not math.isfinite(loss)):
        raise UpdateRejected(f"reply metrics: train-loss expected a finite number, got "
                             f"{loss!r:.40}")
    return blob, {"node_id": node, "blob_bytes": len(blob), "sha256": sha256(blob),
                  "num_examples": n, "train_loss": None if loss is None else float(loss)}


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
        try:
            cfg = reply.content["node"]
            pid, n = cfg["partition-id"], cfg["num-partitions"]
        except Exception as e:  # a malformed reply: not a node of this run
            logger.warning("node %d: malformed query reply (%s: %s); ignored", node,
                           type(e).__name__, e)
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, n)):
            logger.warning("node %d: partition-id / num-partitions expected integers, got "
                           "%.40r / %.40r; ignored", node, pid, n)
        elif n != exp.num_clients or not 0 <= pid < n:
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
    mailboxes = [_Mailbox(client_id(i), len(parts[i])) for i in range(exp.num_clients)]
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
                box.reply = NotDelivered("node not connected")
                continue
            content = RecordDict({
                "global": ArrayRecord({"model": blob_array(model_blob)}),
                "config": ConfigRecord({"round": r, "client-id": box.client_id,
                                        "downlink": server.downlink_name})})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(r), ttl=exp.round_timeout))
            by_node[node] = box
            box.reply = DeliveryUnconfirmed(f"no reply within the round timeout "
                                            f"({exp.round_timeout:g} s)")
        logger.warning("oqfl round %d: sent the global model (%d bytes) to nodes %s", r,
                       len(model_blob), sorted(by_node))
        clients: Dict[str, dict] = {}
        replies = list(grid.send_and_receive(msgs, timeout=exp.round_timeout))
        # push_messages gave every message its id: a reply names the message it answers (a
        # node's reply and an error the SuperLink makes up for a node that went away alike)
        by_message = {m.metadata.message_id: by_node[m.metadata.dst_node_id] for m in msgs}
        for reply in replies:
            box = by_message.get(reply.metadata.reply_to_message_id)
            if box is None:
                continue
            try:
                box.reply, clients[box.client_id] = _read_reply(reply, box)
            except (DeliveryUnconfirmed, UpdateRejected, RuntimeError) as e:
                box.reply = e
        res = server.run_round(r)  # decode, checks, clipping, FedAvg(M), evaluation
        res = dataclasses.replace(res, wall_time_s=time.perf_counter() - t0)
        losses = [(c["train_loss"], c["num_examples"]) for cid, c in clients.items()
                  if cid in res.accepted and c["train_loss"] is not None and c["num_examples"]]
        train_loss = (sum(l * n for l, n in losses) / sum(n for _, n in losses)
                      if losses else None)
        rows.append(round_record(res, downlink_bytes=res.downlink_bytes,
                                 train_loss=train_loss, clients=clients))
        logger.warning("oqfl round %d: accuracy %.4f loss %.4f, accepted %s, dropped %s", r,
                       res.accuracy, res.loss, res.accepted, [c for c, _ in res.dropped])
        save_run(out, config, rows)
    (out / "model.safetensors").write_bytes(encode_state(server.model.state_dict()))
