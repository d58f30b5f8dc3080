"""OQFL uplink for any Flower ClientApp: a client-side Flower Mod.

A FedAvg-style ClientApp gets the global model as the one ArrayRecord of a ``train`` message and
replies with its locally trained model (one ArrayRecord, the same keys) and a MetricRecord
holding ``num-examples``. Put the mod in front of it::

    from oqfl_ext.fl.flower.mod import oqfl_mod            # int4, error feedback
    app = ClientApp(mods=[oqfl_mod])                       # or OQFLMod(bits=8, ...)

and the reply's ArrayRecord (same record key) carries instead one OQFL update blob
(docs/DESIGN.md section 4.2) under the array name :data:`UPDATE_ARRAY`, as raw uint8 bytes
(section 4.5): the update ``local - global`` of the floating-point arrays, quantized per output
channel (4 or 8 bits) with unbiased stochastic rounding, tagged with the round (the config's
``server-round``, which FedAvg-family strategies send), the client id (``str(node_id)``) and
``num-examples``. With error feedback, what the blob failed to carry is kept in the node's
``context.state`` (ArrayRecord :data:`STATE_KEY`, it never leaves the node) and added to the
next round's update. Arrays that are not floating point (``num_batches_tracked``) are not sent:
the server keeps its own. :class:`~oqfl_ext.fl.flower.strategy.OQFLFedAvg` decodes, checks
and aggregates the blobs on the server.

Other message types (``evaluate``, ``query``) pass through untouched. A ``train`` message or
reply the mod cannot handle (not exactly one ArrayRecord, no ``server-round``, a reply whose
arrays differ from those received, no integer ``num-examples``) is answered with an error
reply (``MOD_FAILED_PRECONDITION``) saying why, which the server counts as a failed client.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from flwr.app import ArrayRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from ..client import derive_seed, encode_with_feedback, float_state
from ..._checks import check_int
from ..codec import DEFAULT_COMPRESSION, check_compression
from .wire import blob_array

__all__ = ["OQFLMod", "oqfl_mod", "UPDATE_ARRAY", "STATE_KEY", "ROUND_KEY", "WEIGHT_KEY"]

logger = logging.getLogger("oqfl_ext.fl.flower")

#: the name of the blob's array in the reply's ArrayRecord
UPDATE_ARRAY = "oqfl-update"
#: the node state record holding the error-feedback residual
STATE_KEY = "oqfl-mod-residual"
#: the config key naming the round (FedAvg-family strategies set it)
ROUND_KEY = "server-round"
#: the metric key of the reply's FedAvg weight (Flower's default ``weighted_by_key``)
WEIGHT_KEY = "num-examples"


class _Refused(ValueError):
    pass


def _one(records, what: str, msg_kind: str):
    if len(records) != 1:
        raise _Refused(f"oqfl_mod expects exactly one {what} in the {msg_kind}, found "
                       f"{len(records)}")
    return next(iter(records.items()))


def _torch_state(record: ArrayRecord, what: str) -> Dict[str, torch.Tensor]:
    try:
        return dict(record.to_torch_state_dict())
    except Exception as e:  # e.g. a raw array: not a model
        raise _Refused(f"oqfl_mod: the {what} is not a model's arrays ({type(e).__name__}: "
                       f"{str(e)[:200]})") from None


def _round(msg: Message) -> int:
    for record in msg.content.config_records.values():
        if ROUND_KEY in record:
            try:
                return check_int(f"oqfl_mod: config '{ROUND_KEY}'", record[ROUND_KEY],
                                 minimum=0)
            except ValueError as e:
                raise _Refused(str(e)) from None
    raise _Refused(f"oqfl_mod needs '{ROUND_KEY}' in the train message's config (FedAvg-family "
                   "strategies such as OQFLFedAvg send it)")


class OQFLMod:
    """The client-side mod (see the module docstring).

    Args:
        bits: 4 or 8 (quantized update) or 32 (float32 update, no quantization).
        stochastic: unbiased stochastic rounding (else round half to even).
        error_feedback: keep the quantization error in the node state and add it to the next
            round's update (no effect with ``bits=32``).
        compression: one of :data:`oqfl_ext.fl.codec.COMPRESSIONS`, ``"zstd"`` by default (the
            server's strategy must say the same).
        seed: with the node id and the round, seeds the stochastic rounding.
    """

    def __init__(self, bits: int = 4, *, stochastic: bool = True, error_feedback: bool = True,
                 compression: str = DEFAULT_COMPRESSION, seed: int = 0):
        if isinstance(bits, bool) or bits not in (4, 8, 32):
            raise ValueError(f"bits expected 4, 8 or 32, got {bits!r}")
        check_compression(compression)
        check_int("seed", seed)
        self.bits, self.stochastic, self.compression, self.seed = bits, bool(stochastic), \
            compression, seed
        self.error_feedback = bool(error_feedback) and bits != 32

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.split(".")[0] != "train":
            return call_next(msg, context)
        try:
            _, sent = _one(msg.content.array_records, "ArrayRecord", "train message")
            round_idx = _round(msg)
            global_state = _torch_state(sent, "train message's ArrayRecord")
        except _Refused as e:
            return _error(msg, str(e))
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            return self._encode(reply, global_state, round_idx, context)
        except _Refused as e:
            return _error(msg, str(e))

    def _encode(self, reply: Message, global_state: Dict[str, torch.Tensor], round_idx: int,
                context: Context) -> Message:
        key, record = _one(reply.content.array_records, "ArrayRecord", "ClientApp's reply")
        local = _torch_state(record, "reply's ArrayRecord")
        if list(local) != list(global_state) or any(
                local[k].shape != global_state[k].shape for k in local):
            raise _Refused("oqfl_mod: the reply's arrays differ in names or shapes from the "
                           "ones the ClientApp received")
        _, metrics = _one(reply.content.metric_records, "MetricRecord", "ClientApp's reply")
        try:
            n = check_int(f"oqfl_mod: the reply's MetricRecord '{WEIGHT_KEY}'",
                          metrics.get(WEIGHT_KEY), minimum=0)
        except ValueError as e:
            raise _Refused(str(e)) from None
        glob = float_state(global_state)
        delta = {k: local[k].float() - glob[k].float() for k in glob}
        residual = self._load_residual(context, delta)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, context.node_id, round_idx))
        try:
            blob, residual = encode_with_feedback(
                delta, residual, bits=self.bits, round=round_idx,
                client_id=str(context.node_id), num_samples=n, stochastic=self.stochastic,
                generator=gen, error_feedback=self.error_feedback,
                compression=self.compression)
        except ValueError as e:  # e.g. a diverged model: non-finite values
            raise _Refused(f"oqfl_mod cannot encode the update: {e}") from None
        if residual is not None:
            context.state[STATE_KEY] = ArrayRecord(residual)
        reply.content.array_records[key] = ArrayRecord({UPDATE_ARRAY: blob_array(blob)})
        return reply

    def _load_residual(self, context: Context, delta) -> Optional[Dict[str, torch.Tensor]]:
        if not self.error_feedback or STATE_KEY not in context.state:
            return None
        residual = dict(context.state[STATE_KEY].to_torch_state_dict())
        if list(residual) != list(delta) or any(residual[k].shape != delta[k].shape
                                                for k in delta):
            logger.warning("oqfl_mod: the model changed since the last round; the "
                           "error-feedback residual is dropped")
            return None
        return residual


def _error(msg: Message, reason: str) -> Message:
    logger.error("%s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


#: the mod with its defaults: int4 updates, stochastic rounding, error feedback
oqfl_mod = OQFLMod()
