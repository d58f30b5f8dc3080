"""OQFL aggregation for any Flower ServerApp: a FedAvg-compatible Strategy.

:class:`OQFLFedAvg` is Flower's ``FedAvg`` (same sampling, configuration, evaluation and
``start`` loop; the global model still goes down as a plain ArrayRecord) whose
``aggregate_train`` takes the OQFL update blobs that :mod:`oqfl_ext.fl.flower.mod` puts in the
ClientApps' replies. Each reply is checked before anything of it is used, with the checks of the
package's own server (:func:`oqfl_ext.fl.server.accept_update`: the blob's framing, digest,
names and shapes against the global model sent that round, the round number, the client id
equal to the replying node's id, the ``num-examples`` claim capped at ``max_num_examples``,
clipping to ``norm_bound``), and a reply that fails is dropped with its reason (logged, and in
:attr:`OQFLFedAvg.last_round`). The accepted updates are averaged, weighted by their (capped)
``num-examples`` (:meth:`oqfl_ext.fl.Server.aggregate`), and added to the global model's
floating-point arrays; the other arrays (``num_batches_tracked``) stay the server's. A step
that would make the model non-finite is not applied (:func:`oqfl_ext.fl.server.step_problem`).

The replies' other metrics are averaged as FedAvg does, with the capped weights; the returned
MetricRecord adds ``oqfl-accepted``, ``oqfl-dropped`` (counts) and ``oqfl-uplink-bytes`` (the
blobs' total length).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..client import float_state
from ..codec import DEFAULT_COMPRESSION, UpdateRejected, check_compression
from ..server import Server, accept_update, step_problem
from .mod import UPDATE_ARRAY
from .wire import array_bytes

__all__ = ["OQFLFedAvg", "RoundReport"]

logger = logging.getLogger("oqfl_ext.fl.flower")

MaxExamples = Union[None, int, Callable[[int], Optional[int]]]


@dataclasses.dataclass
class RoundReport:
    """What :meth:`OQFLFedAvg.aggregate_train` did in one round (node ids as ints)."""

    round: int
    accepted: List[int] = dataclasses.field(default_factory=list)
    dropped: List[Tuple[int, str]] = dataclasses.field(default_factory=list)
    capped: List[int] = dataclasses.field(default_factory=list)
    clipped: List[int] = dataclasses.field(default_factory=list)
    uplink_bytes: int = 0
    num_examples: int = 0
    step_rejected: Optional[str] = None


class OQFLFedAvg(FedAvg):
    """FedAvg over OQFL update blobs (see the module docstring).

    Args:
        max_num_examples: how many examples a node may claim at most: an int for every node,
            a callable ``node_id -> int or None``, or None (claims are taken as they are).
        norm_bound: clip each update's global L2 norm to this (> 0); None: no clipping.
        compression: what the clients' mod was given (``"zstd"`` by default).
        **fedavg_kwargs: Flower ``FedAvg``'s arguments (``fraction_train``,
            ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(self, *, max_num_examples: MaxExamples = None,
                 norm_bound: Optional[float] = None, compression: str = DEFAULT_COMPRESSION,
                 **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if not (max_num_examples is None or callable(max_num_examples) or (
                isinstance(max_num_examples, int) and not isinstance(max_num_examples, bool)
                and max_num_examples >= 0)):
            raise ValueError(f"max_num_examples expected None, a non-negative integer or a "
                             f"callable node_id -> int, got {max_num_examples!r}")
        if norm_bound is not None and (isinstance(norm_bound, bool) or not isinstance(
                norm_bound, (int, float)) or not 0 < norm_bound < float("inf")):
            raise ValueError(f"norm_bound expected None or a positive number, got "
                             f"{norm_bound!r}")
        check_compression(compression)
        self.max_num_examples = max_num_examples
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.compression = compression
        self._sent: Optional[Tuple[int, ArrayRecord]] = None
        self.last_round: Optional[RoundReport] = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # the updates of this round are deltas against exactly these arrays
        self._sent = (server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _limit(self, node_id: int) -> Optional[int]:
        limit = self.max_num_examples
        return limit(node_id) if callable(limit) else limit

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        if self._sent is None or self._sent[0] != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for "
                               "that round: the global arrays the updates refer to are unknown")
        state = dict(self._sent[1].to_torch_state_dict())
        template = float_state(state)
        report = RoundReport(server_round)
        accepted: List[Tuple[Dict[str, torch.Tensor], int, RecordDict]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                if node in report.accepted:
                    raise UpdateRejected(f"a second reply from node {node} in this round")
                blob, content = self._read(msg)
                report.uplink_bytes += len(blob)
                got = accept_update(blob, template, round_idx=server_round,
                                    client_id=str(node), max_samples=self._limit(node),
                                    norm_bound=self.norm_bound, compression=self.compression)
                claimed = content.metric_records[_metric_key(content)].get(
                    self.weighted_by_key)
                if claimed != got.claimed_samples:
                    raise UpdateRejected(f"reply metrics: {self.weighted_by_key} {claimed!r:.40}"
                                         f" differs from the blob's {got.claimed_samples}")
            except (UpdateRejected, RuntimeError) as e:
                report.dropped.append((node, str(e)))
                logger.warning("round %d: node %d dropped: %s", server_round, node, e)
                continue
            if got.num_samples < got.claimed_samples:
                report.capped.append(node)
                logger.warning("round %d: node %d claims %d examples, at most %d; capped",
                               server_round, node, got.claimed_samples, got.num_samples)
            if got.clipped:
                report.clipped.append(node)
            report.accepted.append(node)
            accepted.append((got.update, got.num_samples, content))
        report.num_examples = sum(n for _, n, _ in accepted)
        self.last_round = report
        metrics = self._metrics(accepted, report)
        if report.num_examples <= 0:
            logger.warning("round %d: no update with examples accepted; global model "
                           "unchanged", server_round)
            return None, metrics
        avg = Server.aggregate([(u, n) for u, n, _ in accepted])
        new = {k: state[k] + avg[k].to(state[k].dtype) for k in avg}
        report.step_rejected = step_problem(new)
        if report.step_rejected is not None:
            logger.warning("round %d: aggregate not applied: %s", server_round,
                           report.step_rejected)
            return None, metrics
        state.update(new)
        return ArrayRecord(state), metrics

    def _read(self, msg: Message) -> Tuple[bytes, RecordDict]:
        """The blob of a reply in the mod's layout, or why it is dropped."""
        if msg.has_error():
            raise RuntimeError(f"ClientApp error {msg.error.code}: {str(msg.error.reason)[:200]}")
        content = msg.content
        try:
            records = content.array_records
            if len(records) != 1:
                raise UpdateRejected(f"expected one ArrayRecord, got {len(records)}")
            record = next(iter(records.values()))
            if list(record) != [UPDATE_ARRAY]:
                raise UpdateRejected(f"expected the ArrayRecord to hold only "
                                     f"{UPDATE_ARRAY!r} (is oqfl_mod on the ClientApp?), got "
                                     f"{list(record)[:5]!r:.100}")
            _metric_key(content)
            return array_bytes(record[UPDATE_ARRAY]), content
        except UpdateRejected as e:
            raise UpdateRejected(f"malformed reply: {e}") from None
        except Exception as e:
            raise UpdateRejected(f"malformed reply ({type(e).__name__}: {str(e)[:200]})") \
                from None

    def _metrics(self, accepted, report: RoundReport) -> MetricRecord:
        """The accepted replies' metrics averaged with the capped weights, plus the counts."""
        out = MetricRecord()
        if report.num_examples > 0:
            weighted = []
            for _, n, content in accepted:
                m = MetricRecord(dict(content.metric_records[_metric_key(content)]))
                m[self.weighted_by_key] = n
                weighted.append(RecordDict({"metrics": m}))
            try:
                out = self.train_metrics_aggr_fn(weighted, self.weighted_by_key)
            except Exception as e:  # metrics the clients chose; the model is what matters
                logger.warning("round %d: client metrics not aggregated (%s: %s)",
                               report.round, type(e).__name__, e)
                out = MetricRecord()
        out["oqfl-accepted"] = len(report.accepted)
        out["oqfl-dropped"] = len(report.dropped)
        out["oqfl-uplink-bytes"] = report.uplink_bytes
        return out


def _metric_key(content: RecordDict) -> str:
    keys = list(content.metric_records)
    if len(keys) != 1:
        raise UpdateRejected(f"expected one MetricRecord, got {len(keys)}")
    return keys[0]
