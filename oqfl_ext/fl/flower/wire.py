"""What the ServerApp and the ClientApps put in their messages.

Bytes travel as one ``Array(dtype="uint8", shape=(n,), stype="raw", data=blob)`` in an
ArrayRecord (Flower splits large arrays into chunks on the wire and checks them), so what a
ClientApp sends is exactly the blob of docs/DESIGN.md section 4 and the ServerApp receives it
byte for byte; nothing is pickled.

``train`` message (ServerApp -> ClientApp)::

    "global": ArrayRecord {"model": Array(raw uint8: the Server's downlink blob)}
    "config": ConfigRecord {"round": int, "client-id": str,
                            "downlink": "float32" | "int8" | "int4-delta" | "int8-delta"}

``train`` reply (ClientApp -> ServerApp)::

    "update":  ArrayRecord {"blob": Array(raw uint8: encode_update's blob)}
    "metrics": MetricRecord {"num-examples": int, "blob-bytes": int, "train-loss": float}

``query`` message / reply: empty / ConfigRecord {"partition-id", "num-partitions"} of the node.

Downlink: ``"model"`` is exactly what the in-process Server hands its clients, its downlink
codec's blob (:func:`oqfl_ext.fl.downlink_codec`: an :func:`oqfl_ext.fl.codec.encode_model`
blob, format ``"oqfl-model"``). It carries every ``state_dict`` entry: the floating-point ones
(float32, or int8 codes for ``"int8"``) and, exactly, the integer and bool ones (batch-norm
``num_batches_tracked``, the quantizers' ``initialized``/``signed`` flags, set by the server's
calibration). The ClientApp decodes it against its own model's full ``state_dict`` and thus
trains from the same state as an in-process client. With a delta downlink ``"model"`` is the
client's own blob (:meth:`oqfl_ext.fl.Server.downlink_for`: a chain of deltas or a snapshot,
:mod:`oqfl_ext.fl.downlink`), which the ClientApp applies to the broadcast model it keeps in
its ``context.state``.

A plain state dict (the ServerApp's final ``model.safetensors``, a ClientApp's state between
rounds in ``context.state``) is a safetensors blob with metadata
``{"format": "oqfl-state", "version": "1"}`` (:func:`encode_state`); it never travels in a
``train`` message.
"""

from __future__ import annotations

import hashlib

from ..._io import encode_state
from ..codec import UpdateRejected

__all__ = ["encode_state", "blob_array", "array_bytes", "sha256"]


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def blob_array(blob: bytes):
    """``Array(dtype="uint8", shape=(n,), stype="raw", data=blob)``."""
    from flwr.app import Array

    return Array(dtype="uint8", shape=(len(blob),), stype="raw", data=bytes(blob))


def array_bytes(array) -> bytes:
    """The bytes of an Array made by :func:`blob_array` (checks dtype, stype and length)."""
    if array.dtype != "uint8" or array.stype != "raw" or tuple(array.shape) != (len(array.data),):
        raise UpdateRejected(f"expected a raw uint8 array of {len(array.data)} bytes, got "
                             f"dtype {array.dtype!r} stype {array.stype!r} shape "
                             f"{tuple(array.shape)}")
    return bytes(array.data)
