"""Wire format of a federated client update (DESIGN.md section 4).

An update (a dict of named float tensors, e.g. ``new_weights - global_weights``) travels as ONE
safetensors blob; nothing on this path uses pickle.

Tensors (safetensors keys), for each parameter ``NAME`` of the update:

* ``bits`` 4 or 8: ``NAME::codes``, uint8 ``[ceil(numel * bits / 8)]``, the signed codes packed by
  :func:`oqfl_ext.ops.quantize_pack` (layout: :func:`oqfl_ext.ops.pack`), and ``NAME::scale``,
  float32 step sizes: ``[shape[0]]`` (per output channel, ``axis = 0``) for tensors with 2 or more
  dimensions, ``[1]`` (per tensor, ``axis = null``) for 0-D and 1-D tensors. A step size is
  ``max|slice| / qmax`` (qmax 7 or 127); a slice of zeros gets the smallest normal float32 instead
  of 0. Values are recovered as ``code * scale``: the error is at most ``scale / 2`` with
  round-half-to-even, below ``scale`` with (unbiased) stochastic rounding.
* ``bits`` 32: ``NAME::values``, the float32 values with the parameter's shape.

Metadata (safetensors string metadata; every key is required and no other is allowed):

=================  =====================================================================
``format``         ``"oqfl-update"``
``version``        ``"1"``
``bits``           ``"4"``, ``"8"`` or ``"32"``
``params``         JSON list, in the update's order, of
                   ``{"name": str, "shape": [int, ...], "dtype": str, "axis": 0 | null}``
                   (``dtype``: the dtype the client's tensor had, e.g. ``"float32"``)
``round``          decimal integer >= 0
``client_id``      the client's id (printable text, at most 256 characters)
``num_samples``    decimal integer >= 0 (the FedAvg weight)
``codec``          JSON ``{"rounding": "stochastic" | "half_even", "scale": "absmax",
                   "granularity": "per_channel_axis0_for_ndim_ge_2"}``
``digest``         ``"sha256:" + hex`` of SHA-256 over every other metadata field (canonical
                   JSON, sorted keys) and, for every tensor in name order, its name, dtype, shape
                   and raw bytes
=================  =====================================================================

Decoding (:func:`decode_update`) checks the safetensors framing itself (header length, JSON,
canonical compact encoding, offsets that tile the data exactly, no trailing bytes), the format,
version, digest, names, shapes and sizes against the receiver's template, scale shapes and values,
and finite float32 values; whatever is wrong raises :class:`UpdateRejected` (a ValueError) whose
message says what. A single changed byte anywhere in a blob, header included, is rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops

__all__ = ["encode_update", "decode_update", "UpdateRejected", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "oqfl-update"
FORMAT_VERSION = "1"
_BITS = (4, 8, 32)
_QMAX = {4: 7, 8: 127}
_META_KEYS = frozenset({"format", "version", "bits", "params", "round", "client_id",
                        "num_samples", "codec", "digest"})
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_ST_DTYPES = {torch.uint8: "U8", torch.float32: "F32"}
_ST_ITEMSIZE = {"U8": 1, "F32": 4}
_TINY = torch.finfo(torch.float32).tiny
_MAX_HEADER = 64 << 20
_MAX_CLIENT_ID = 256
_SUFFIX_CODES, _SUFFIX_SCALE, _SUFFIX_VALUES = "::codes", "::scale", "::values"


class UpdateRejected(ValueError):
    """A received update blob is malformed, corrupted or disagrees with the global model."""


# ----------------------------------------------------------------------------------------------
# encoding

def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} expected a str, got {type(value).__name__}")
    if len(value) > _MAX_CLIENT_ID:
        raise ValueError(f"{name} expected at most {_MAX_CLIENT_ID} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError(f"{name} must be printable text, got {value!r}")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} expected a non-negative integer, got {value!r}")
    return value


def _scales(x: Tensor, bits: int) -> Tuple[Tensor, Optional[int]]:
    """(float32 step sizes, axis) of a float32 tensor: per channel along axis 0 for dim >= 2."""
    qmax = _QMAX[bits]
    if x.dim() >= 2:
        if x.numel() == 0:
            amax = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        else:
            amax = x.abs().reshape(x.shape[0], -1).amax(dim=1)
        axis: Optional[int] = 0
    else:
        amax = (x.abs().amax() if x.numel() else x.new_zeros(())).reshape(1)
        axis = None
    return (amax / qmax).clamp_min(_TINY).to(torch.float32).contiguous(), axis


def encode_update(update: Dict[str, Tensor], *, bits: int, round: int = 0, client_id: str = "",
                  num_samples: int = 0, stochastic: bool = True,
                  generator: Optional[torch.Generator] = None) -> bytes:
    """Serializes a client update into one safetensors blob (format: the module docstring).

    Args:
        update: parameter name -> float tensor (float32/16, bfloat16 or float64; any device,
            any strides). Values must be finite.
        bits: 4 or 8 (signed codes with per-channel/per-tensor float32 step sizes) or 32
            (float32 values as they are).
        round, num_samples: non-negative integers stored in the metadata.
        client_id: printable text (at most 256 characters).
        stochastic: unbiased stochastic rounding (True) or round half to even (False);
            ignored with bits=32.
        generator: the generator stochastic rounding draws its seeds from (one per parameter,
            see :func:`oqfl_ext.ops.quantize_pack`); None: the default generator.

    Returns:
        The blob (bytes). Raises ValueError/TypeError for bad arguments or non-finite values.
    """
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits expected one of {_BITS}, got {bits!r}")
    round = _check_count("round", round)
    num_samples = _check_count("num_samples", num_samples)
    _check_text("client_id", client_id)
    if not isinstance(update, dict) or not update:
        raise ValueError("update expected a non-empty dict of name -> tensor")
    tensors: Dict[str, Tensor] = {}
    params: List[dict] = []
    for name, value in update.items():
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ValueError(f"update names must be non-empty printable strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"update[{name!r}] expected a Tensor, got {type(value).__name__}")
        dtype_name = str(value.dtype).replace("torch.", "")
        if dtype_name not in _DTYPES:
            raise ValueError(f"update[{name!r}] expected a floating dtype "
                             f"({', '.join(_DTYPES)}), got {value.dtype}")
        x = value.detach().to(torch.float32).contiguous()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"update[{name!r}] has non-finite values")
        entry = {"name": name, "shape": list(x.shape), "dtype": dtype_name, "axis": None}
        if bits == 32:
            tensors[name + _SUFFIX_VALUES] = x.cpu()
        else:
            scale, axis = _scales(x, bits)
            entry["axis"] = axis
            codes = ops.quantize_pack(x, scale, bits=bits, axis=axis, stochastic=stochastic,
                                      generator=generator)
            tensors[name + _SUFFIX_CODES] = codes.cpu()
            tensors[name + _SUFFIX_SCALE] = scale.cpu()
        params.append(entry)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bits": str(bits),
        "params": json.dumps(params, separators=(",", ":")),
        "round": str(round),
        "client_id": client_id,
        "num_samples": str(num_samples),
        "codec": json.dumps(_codec_options(bits, stochastic), separators=(",", ":"),
                            sort_keys=True),
    }
    meta["digest"] = _digest(meta, {k: (_ST_DTYPES[t.dtype], list(t.shape), _raw(t))
                                    for k, t in tensors.items()})
    from safetensors.torch import save
    return save(tensors, metadata=meta)


def _codec_options(bits: int, stochastic: bool) -> dict:
    if bits == 32:
        return {"rounding": "none", "scale": "none", "granularity": "none"}
    return {"rounding": "stochastic" if stochastic else "half_even", "scale": "absmax",
            "granularity": "per_channel_axis0_for_ndim_ge_2"}


def _raw(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b""


def _digest(meta: Dict[str, str], tensors: Dict[str, Tuple[str, List[int], bytes]]) -> str:
    h = hashlib.sha256()
    h.update(b"oqfl-update-digest\x00")
    fields = {k: v for k, v in meta.items() if k != "digest"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for key in sorted(tensors):
        dtype, shape, data = tensors[key]
        k = key.encode("utf-8")
        h.update(struct.pack("<Q", len(k)) + k)
        h.update(dtype.encode("ascii") + b"\x00")
        h.update(struct.pack("<Q", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape))
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# decoding

def _reject(msg: str):
    raise UpdateRejected(f"update rejected: {msg}")


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate JSON key {k!r}")
        seen[k] = v
    return seen


def _parse_framing(blob: bytes):
    """(metadata dict, {key: (dtype, shape, (begin, end))}, data offset) of a safetensors blob,
    checked to be in the canonical form safetensors writes."""
    if len(blob) < 8:
        _reject(f"not a safetensors blob: {len(blob)} bytes, fewer than the 8-byte header size")
    (n,) = struct.unpack("<Q", blob[:8])
    if n < 2 or n > _MAX_HEADER or 8 + n > len(blob):
        _reject(f"not a safetensors blob or truncated: header size {n} with {len(blob)} bytes")
    if n % 8:
        _reject(f"safetensors header size {n} is not a multiple of 8")
    raw = blob[8:8 + n]
    body = raw.rstrip(b" ")
    if n - len(body) >= 8:
        _reject("safetensors header has more than 7 bytes of padding")
    try:
        text = body.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _reject(f"safetensors header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _reject("safetensors header is not a JSON object")
    if json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text:
        _reject("safetensors header is not in canonical (compact) form")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _reject("safetensors header has no string metadata")
    entries = {}
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _reject(f"tensor {key!r}: malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_ITEMSIZE:
            _reject(f"tensor {key!r}: dtype {dtype!r}, expected U8 or F32")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            _reject(f"tensor {key!r}: malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            _reject(f"tensor {key!r}: malformed data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            _reject(f"tensor {key!r}: {offsets[1] - offsets[0]} data bytes for shape {shape} "
                    f"of {dtype}")
        entries[key] = (dtype, shape, (offsets[0], offsets[1]))
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            _reject("tensor data offsets do not tile the data section")
        pos = e
    if 8 + n + pos != len(blob):
        _reject(f"blob is {len(blob)} bytes, but its header describes {8 + n + pos} "
                "(truncated or trailing bytes)")
    return meta, entries, 8 + n


def _parse_int(meta: Dict[str, str], key: str) -> int:
    v = meta[key]
    if not (v.isascii() and v.isdigit()) or (len(v) > 1 and v[0] == "0") or len(v) > 19:
        _reject(f"metadata {key!r} is not a non-negative integer: {v!r}")
    return int(v)


def _parse_params(meta: Dict[str, str], bits: int):
    try:
        params = json.loads(meta["params"], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        _reject(f"metadata 'params' is not valid JSON ({e})")
    if not isinstance(params, list) or not params:
        _reject("metadata 'params' is not a non-empty list")
    out = []
    for p in params:
        if not isinstance(p, dict) or set(p) != {"name", "shape", "dtype", "axis"}:
            _reject(f"metadata 'params' has a malformed entry: {p!r:.200}")
        name, shape, dtype, axis = p["name"], p["shape"], p["dtype"], p["axis"]
        if not isinstance(name, str) or not name:
            _reject(f"metadata 'params' has a bad name: {name!r:.200}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            _reject(f"parameter {name!r}: malformed shape {shape!r:.200}")
        if dtype not in _DTYPES:
            _reject(f"parameter {name!r}: unknown dtype {dtype!r:.50}")
        if bits == 32:
            if axis is not None:
                _reject(f"parameter {name!r}: axis {axis!r} with bits=32")
        elif axis is not None and not (type(axis) is int and 0 <= axis < len(shape)):
            _reject(f"parameter {name!r}: axis {axis!r} out of range for shape {shape}")
        out.append((name, shape, axis))
    names = [p[0] for p in out]
    if len(set(names)) != len(names):
        _reject("metadata 'params' lists a parameter twice")
    return out


def _tensor_bytes(blob: bytes, entries, data_start: int):
    return {k: (dt, shape, blob[data_start + b:data_start + e])
            for k, (dt, shape, (b, e)) in entries.items()}


def decode_update(blob: bytes, template: Dict[str, Tensor], *,
                  return_info: bool = False):
    """Checks and decodes a blob of :func:`encode_update` against the receiver's model.

    Args:
        blob: the bytes received (bytes, bytearray or memoryview).
        template: name -> tensor of the global model (e.g. its ``state_dict()`` restricted to
            the parameters clients send): the blob must carry exactly these names with these
            shapes.
        return_info: also return a dict ``{"round", "client_id", "num_samples", "bits",
            "codec"}`` of the blob's metadata.

    Returns:
        name -> float32 tensor with the template's shape, on the template tensor's device, in
        the template's order (and the info dict with ``return_info``).

    Raises:
        UpdateRejected: the blob is not a valid update for this template; the message says why.
            Nothing is returned in part.
        TypeError: ``template`` is not a dict of tensors (a caller error, not a bad blob).
    """
    if not isinstance(template, dict) or not all(isinstance(v, Tensor) for v in template.values()):
        raise TypeError("template expected a dict of name -> Tensor")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise UpdateRejected(f"update rejected: expected bytes, got {type(blob).__name__}")
    try:
        return _decode(bytes(blob), template, return_info)
    except UpdateRejected:
        raise
    except Exception as e:  # any other parsing failure is a rejection too, never a crash
        raise UpdateRejected(f"update rejected: malformed blob ({type(e).__name__}: {e})") from e


def _decode(blob: bytes, template: Dict[str, Tensor], return_info: bool):
    meta, entries, data_start = _parse_framing(blob)
    if meta.get("format") != FORMAT_NAME:
        _reject(f"format {meta.get('format')!r:.80}, expected {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        _reject(f"format version {meta.get('version')!r:.80}, expected {FORMAT_VERSION!r}")
    if set(meta) != _META_KEYS:
        missing, extra = sorted(_META_KEYS - set(meta)), sorted(set(meta) - _META_KEYS)
        _reject(f"metadata keys differ (missing {missing}, unexpected {extra})")
    tensors = _tensor_bytes(blob, entries, data_start)
    if _digest(meta, tensors) != meta["digest"]:
        _reject("digest mismatch: the blob was corrupted or altered")
    if meta["bits"] not in ("4", "8", "32"):
        _reject(f"bits {meta['bits']!r:.20}, expected 4, 8 or 32")
    bits = int(meta["bits"])
    round_, num_samples = _parse_int(meta, "round"), _parse_int(meta, "num_samples")
    params = _parse_params(meta, bits)
    try:
        codec = json.loads(meta["codec"])
    except ValueError as e:
        _reject(f"metadata 'codec' is not valid JSON ({e})")
    if not isinstance(codec, dict):
        _reject("metadata 'codec' is not a JSON object")

    names = [p[0] for p in params]
    if set(names) != set(template):
        missing = sorted(set(template) - set(names))
        extra = sorted(set(names) - set(template))
        _reject(f"parameter names differ from the model's: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
                f"{' ...' if len(extra) > 10 else ''}")
    expected_keys = set()
    for name, _, _ in params:
        if bits == 32:
            expected_keys.add(name + _SUFFIX_VALUES)
        else:
            expected_keys.update((name + _SUFFIX_CODES, name + _SUFFIX_SCALE))
    if set(tensors) != expected_keys:
        _reject(f"tensors differ from the parameter list: missing "
                f"{sorted(expected_keys - set(tensors))[:10]}, unexpected "
                f"{sorted(set(tensors) - expected_keys)[:10]}")

    decoded: Dict[str, Tensor] = {}
    for name, shape, axis in params:
        want = list(template[name].shape)
        if shape != want:
            _reject(f"parameter {name!r}: shape {shape}, the model has {want}")
        numel = math.prod(shape)
        if bits == 32:
            dt, tshape, data = tensors[name + _SUFFIX_VALUES]
            if dt != "F32" or tshape != shape:
                _reject(f"parameter {name!r}: values are {dt} {tshape}, expected F32 {shape}")
            x = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape) \
                if numel else torch.zeros(shape, dtype=torch.float32)
            if numel and not bool(torch.isfinite(x).all()):
                _reject(f"parameter {name!r}: non-finite values")
        else:
            dt, cshape, codes = tensors[name + _SUFFIX_CODES]
            nbytes = (numel * bits + 7) // 8
            if dt != "U8" or cshape != [nbytes]:
                _reject(f"parameter {name!r}: packed codes are {dt} {cshape}, expected U8 "
                        f"[{nbytes}] (ceil({numel} * {bits} / 8))")
            dt, sshape, sdata = tensors[name + _SUFFIX_SCALE]
            nscale = 1 if axis is None else shape[axis]
            if dt != "F32" or sshape != [nscale]:
                _reject(f"parameter {name!r}: scale is {dt} {sshape}, expected F32 [{nscale}]")
            scale = (torch.frombuffer(bytearray(sdata), dtype=torch.float32) if nscale
                     else torch.zeros(0, dtype=torch.float32))
            ok = torch.isfinite(scale) & (scale > 0)
            if nscale and not bool(ok.all()):
                _reject(f"parameter {name!r}: scales must be finite and positive, got "
                        f"{scale[~ok][:4].tolist()}")
            packed = (torch.frombuffer(bytearray(codes), dtype=torch.uint8) if nbytes
                      else torch.zeros(0, dtype=torch.uint8))
            if numel:
                x = ops.unpack_dequantize(packed, scale, bits=bits, shape=shape, axis=axis)
                if not bool(torch.isfinite(x).all()):  # a huge scale times a code
                    _reject(f"parameter {name!r}: scale too large, code * scale overflows "
                            "float32")
            else:
                x = torch.zeros(shape, dtype=torch.float32)
        decoded[name] = x
    out = {name: decoded[name].to(template[name].device) for name in template}
    if return_info:
        return out, {"round": round_, "client_id": meta["client_id"],
                     "num_samples": num_samples, "bits": bits, "codec": codec}
    return out
