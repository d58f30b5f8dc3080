"""What the ServerApp and the ClientApps put in their messages.

Bytes travel as one ``Array(dtype="uint8", shape=(n,), stype="raw", data=blob)`` in an
ArrayRecord (Flower splits large arrays into chunks on the wire and checks them), so what a
ClientApp sends is exactly the blob of DESIGN.md section 4 and the ServerApp receives it
byte for byte; nothing is pickled.

``train`` message (ServerApp -> ClientApp)::

    "global": ArrayRecord {"model":  Array(raw uint8: the Server's downlink blob),
                           "extras": Array(raw uint8: encode_state of the non-float entries)}
    "config": ConfigRecord {"round": int, "client-id": str, "downlink": "float32" | "int8"}

``train`` reply (ClientApp -> ServerApp)::

    "update":  ArrayRecord {"blob": Array(raw uint8: encode_update's blob)}
    "metrics": MetricRecord {"num-examples": int, "blob-bytes": int, "train-loss": float}

``query`` message / reply: empty / ConfigRecord {"partition-id", "num-partitions"} of the node.

Downlink: ``"model"`` is exactly what the in-process Server hands its clients, its downlink
codec's blob (:func:`oqfl_ext.fl.downlink_codec`: the floating-point entries). In process the
entries that codec does not carry (batch-norm ``num_batches_tracked``, the quantizers'
``initialized``/``signed`` flags, set by the server's calibration) keep the server's values;
across machines the client has no such values, so they travel too, as ``"extras"``: a
safetensors blob with metadata ``{"format": "oqfl-model", "version": "1"}``
(:func:`encode_state`; :func:`decode_state` checks names, shapes and dtypes against the
receiver's own model). The ClientApp thus trains from the same state as an in-process client.
"""

from __future__ import annotations

import hashlib
from typing import Dict

import torch
from torch import Tensor

from ..codec import UpdateRejected

__all__ = ["encode_state", "decode_state", "blob_array", "array_bytes", "MODEL_FORMAT",
           "sha256", "split_state"]

MODEL_FORMAT = "oqfl-model"
MODEL_VERSION = "1"


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def encode_state(state: Dict[str, Tensor]) -> bytes:
    """A state dict as one safetensors blob (CPU, contiguous copies)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save(tensors, metadata={"format": MODEL_FORMAT, "version": MODEL_VERSION})


def decode_state(blob: bytes, template: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The state dict in ``blob``, checked against ``template`` (names, shapes, dtypes, finite
    floats); raises :class:`oqfl_ext.fl.UpdateRejected` saying what is wrong."""
    import json
    import struct

    from safetensors.torch import load

    if not isinstance(blob, (bytes, bytearray)) or len(blob) < 8:
        raise UpdateRejected("global model: expected a safetensors blob")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    try:
        meta = json.loads(bytes(blob[8:8 + n])).get("__metadata__", {})
    except ValueError as e:
        raise UpdateRejected(f"global model: unreadable header ({e})") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise UpdateRejected(f"global model: format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}, expected {MODEL_FORMAT!r} "
                             f"{MODEL_VERSION!r}")
    try:
        state = load(bytes(blob))
    except Exception as e:  # safetensors raises its own error types
        raise UpdateRejected(f"global model: {type(e).__name__}: {e}") from None
    if set(state) != set(template):
        missing, extra = sorted(set(template) - set(state)), sorted(set(state) - set(template))
        raise UpdateRejected(f"global model: names differ from the local model's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
    out = {}
    for k, ref in template.items():
        v = state[k]
        if v.shape != ref.shape or v.dtype != ref.dtype:
            raise UpdateRejected(f"global model: {k} is {v.dtype} {tuple(v.shape)}, expected "
                                 f"{ref.dtype} {tuple(ref.shape)}")
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise UpdateRejected(f"global model: {k} has non-finite values")
        out[k] = v
    return out


def split_state(state: Dict[str, Tensor]):
    """(floating-point entries, the others) of a state dict, each in the state's order."""
    floats = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()}
    return floats, {k: v for k, v in state.items() if k not in floats}


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
