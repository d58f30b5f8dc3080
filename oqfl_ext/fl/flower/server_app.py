"""The Flower ServerApp: the OQFL federation of :class:`oqfl_ext.fl.Server`, over Flower messages.

Round ``t`` is :meth:`Server.begin_round` / :meth:`Server.end_round` of the in-process server,
with Flower messages in between:

1. :meth:`Server.begin_round` samples the clients exactly as in process and encodes the global
   state with the downlink codec; client ``I`` (``client-<I>``) is the SuperNode whose node
   config says ``partition-id=I`` (learned once, at the start, with a ``query`` message to
   every node, :data:`QUERY_WINDOW` of them in flight at once: the same code for the SuperNodes
   of the deployment engine and the virtual ones of the simulation runtime);
2. every sampled client's node gets a ``train`` message with that blob (layout: :mod:`.wire`),
   through ``grid.send_and_receive(..., timeout=round-timeout)``; a sampled partition whose
   node is not connected is not sent anything;
3. each reply's blob goes to :meth:`Server.end_round`, so that decoding, the round/client-id
   checks, clipping, FedAvg(M) and the evaluation are the in-process server's own code; a node
   that did not answer within the timeout, or answered with an error, is a dropped client
   (reason in metrics.json), and so is a reply that does not have the layout of :mod:`.wire`
   (its metrics included): every reply is checked before anything of it is used;
4. one record per round (:func:`oqfl_ext.fl.metrics.round_record`, plus ``train_loss`` and
   ``clients``: per answering client its node id, blob length and SHA-256) is written with
   :func:`oqfl_ext.fl.metrics.save_run` (``metrics.json``, ``accuracy.png`` in ``out-dir``)
   after every round, and at the end the global ``state_dict`` (``model.safetensors``,
   :func:`.wire.encode_state`).

Bytes: ``uplink_bytes`` is the sum of the lengths of the update blobs received (as in
process); ``downlink_bytes`` the sum of the lengths of the downlink blobs (the same blob for
every client with ``float32``/``int8``, each client's own chain or snapshot with a delta
downlink, :meth:`Server.downlink_for`) sent to the sampled clients they are known to have
reached: those that replied, with an update or with a
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

import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from . import NO_PHONE_HOME
from .. import experiment as ex
from ..._checks import check_int
from ..codec import UpdateRejected
from ..experiment import ExperimentConfig
from ..metrics import mean_train_loss, round_record, save_run
from ..server import DeliveryUnconfirmed, NotDelivered, RemoteClient
from .task import FlowerSettings, apply_threads, default_out_dir, parse_run_config
from .wire import array_bytes, blob_array, encode_state, sha256

__all__ = ["app"]

logger = logging.getLogger("oqfl_ext.fl.flower")

app = ServerApp()


#: error codes Flower's SuperLink makes up itself for a message nobody answered: the node may
#: or may not have pulled the message (every other error comes from the node, which had it)
_NO_ANSWER_CODES = {ErrorCode.NODE_UNAVAILABLE: "node unavailable (no heartbeat)",
                    ErrorCode.MESSAGE_UNAVAILABLE: "message expired or removed"}


def _read_reply(reply: Message, num_samples: int):
    """``(blob, client record)`` of a train reply from a client assigned ``num_samples``
    examples, or raises why the client is dropped:
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
    if n is not None:
        try:
            n = check_int("reply metrics: num-examples", n, minimum=0, maximum=num_samples)
        except ValueError as e:
            raise UpdateRejected(str(e)) from None
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


#: queries in flight at once while mapping partitions: the simulation runtime's in-memory state
#: looks through every stored message for each virtual node every 0.1 s, so the work of a look
#: grows with nodes x messages (1000 virtual nodes: mapped in 40 s 50 at a time, 46 s all at once)
QUERY_WINDOW = 50


def _read_query_reply(reply: Message, cfg: ExperimentConfig):
    """The partition a ``query`` reply names, or None (logged) for a reply that does not name a
    partition of this run."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        logger.warning("node %d: query failed: %s", node, reply.error.reason)
        return None
    try:
        answer = reply.content["node"]
        pid, n = answer["partition-id"], answer["num-partitions"]
    except Exception as e:  # a malformed reply: not a node of this run
        logger.warning("node %d: malformed query reply (%s: %s); ignored", node,
                       type(e).__name__, e)
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, n)):
        logger.warning("node %d: partition-id / num-partitions expected integers, got "
                       "%.40r / %.40r; ignored", node, pid, n)
        return None
    if n != cfg.clients or not 0 <= pid < n:
        logger.warning("node %d: partition %d of %d does not fit clients=%d; ignored",
                       node, pid, n, cfg.clients)
        return None
    return pid


def _map_partitions(grid: Grid, nodes: List[int], cfg: ExperimentConfig,
                    settings: FlowerSettings, window: int = QUERY_WINDOW) -> Dict[int, int]:
    """partition-id -> node id, from a ``query`` to every node, at most ``window`` of them in
    flight at once, all within ``wait-nodes-timeout``."""
    deadline = time.monotonic() + settings.wait_nodes_timeout
    todo = list(reversed(nodes))
    pending: Dict[str, int] = {}  # message id -> node
    mapping: Dict[int, int] = {}
    while (todo or pending) and time.monotonic() < deadline:
        while todo and len(pending) < window:
            node = todo.pop()
            msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY,
                          group_id="query", ttl=settings.wait_nodes_timeout)
            for msg_id in grid.push_messages([msg]):  # none: the node is gone
                pending[msg_id] = node
        replies = list(grid.pull_messages(list(pending))) if pending else []
        for reply in replies:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            pid = None if node is None else _read_query_reply(reply, cfg)
            if pid is None:
                continue
            if pid in mapping:
                logger.warning("node %d: partition %d is already node %d's; ignored", node,
                               pid, mapping[pid])
            else:
                mapping[pid] = node
        if not replies:
            time.sleep(0.05)
    return mapping


@app.main()
def main(grid: Grid, context: Context) -> None:
    import flwr

    cfg, settings = parse_run_config(context.run_config)
    apply_threads(settings)
    run_id = int(context.run_id)
    out = Path(settings.out_dir) if settings.out_dir else default_out_dir(run_id)
    out.mkdir(parents=True, exist_ok=True)

    data = ex.load_data(cfg)
    parts = ex.make_partitions(cfg, data.train_y)
    clients = [RemoteClient(ex.client_id(cfg, i), len(parts[i])) for i in range(cfg.clients)]
    partition_of = {c.client_id: i for i, c in enumerate(clients)}
    server = ex.make_server(cfg, data, parts, clients)

    t_map = time.monotonic()
    nodes = _wait_for_nodes(grid, cfg.clients, settings.wait_nodes_timeout)
    mapping = _map_partitions(grid, nodes, cfg, settings)
    map_s = time.monotonic() - t_map
    if not mapping:
        raise RuntimeError(f"no SuperNode with a partition of this run answered within "
                           f"{settings.wait_nodes_timeout:g} s (nodes: {nodes})")
    missing = sorted(set(range(cfg.clients)) - set(mapping))
    if missing:
        logger.warning("partitions %s have no node: those clients are dropped", missing)
    logger.warning("oqfl run %d: %d partitions mapped to nodes in %.1f s%s", run_id,
                   len(mapping), map_s, f": {mapping}" if len(mapping) <= 20 else "")

    config = dict(cfg.record(), **settings.record(), engine="flower",
                  flwr_version=flwr.__version__, run_id=run_id,
                  nodes={str(p): n for p, n in sorted(mapping.items())},
                  partition_map_s=round(map_s, 3),
                  flwr_env={k: os.environ.get(k) for k in NO_PHONE_HOME})
    if any(os.environ.get(k) != v for k, v in NO_PHONE_HOME.items()):
        logger.warning("this ServerApp runs without %s: Flower may contact its servers",
                       NO_PHONE_HOME)
    config["out_dir"] = str(out)
    rows: List[dict] = []
    for r in range(cfg.rounds):
        sampled, _ = server.begin_round(r)
        alive = set(grid.get_node_ids())
        replies: Dict[str, object] = {}
        msgs, by_node = [], {}
        for client in sampled:
            node = mapping.get(partition_of[client.client_id])
            if node is None or node not in alive:
                replies[client.client_id] = NotDelivered("node not connected")
                continue
            model_blob = server.downlink_for(client.client_id)  # a chain or snapshot (delta)
            content = RecordDict({
                "global": ArrayRecord({"model": blob_array(model_blob)}),
                "config": ConfigRecord({"round": r, "client-id": client.client_id,
                                        "downlink": server.downlink_name})})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(r), ttl=settings.round_timeout))
            by_node[node] = client
            replies[client.client_id] = DeliveryUnconfirmed(
                f"no reply within the round timeout ({settings.round_timeout:g} s)")
        logger.warning("oqfl round %d: sent the global model (%d bytes in all) to nodes %s", r,
                       sum(len(server.downlink_for(c.client_id)) for c in by_node.values()),
                       sorted(by_node))
        answered: Dict[str, dict] = {}
        received = list(grid.send_and_receive(msgs, timeout=settings.round_timeout))
        # push_messages gave every message its id: a reply names the message it answers (a
        # node's reply and an error the SuperLink makes up for a node that went away alike)
        by_message = {m.metadata.message_id: by_node[m.metadata.dst_node_id] for m in msgs}
        for reply in received:
            client = by_message.get(reply.metadata.reply_to_message_id)
            if client is None:
                continue
            cid = client.client_id
            try:
                replies[cid], answered[cid] = _read_reply(reply, client.num_samples)
            except (DeliveryUnconfirmed, UpdateRejected, RuntimeError) as e:
                replies[cid] = e
        res = server.end_round(r, replies)  # decode, checks, clipping, FedAvg(M), evaluation
        train_loss = mean_train_loss((c["train_loss"], c["num_examples"])
                                     for cid, c in answered.items() if cid in res.accepted)
        extra = ({} if server.broadcast is None
                 else {"downlink_snapshots": list(res.downlink_snapshots)})
        rows.append(round_record(res, downlink_bytes=res.downlink_bytes,
                                 train_loss=train_loss, clients=answered, **extra))
        logger.warning("oqfl round %d: accuracy %.4f loss %.4f, accepted %s, dropped %s", r,
                       res.accuracy, res.loss, res.accepted, [c for c, _ in res.dropped])
        save_run(out, config, rows)
    (out / "model.safetensors").write_bytes(encode_state(server.model.state_dict()))
