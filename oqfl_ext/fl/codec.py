"""Wire formats of a federated client update (docs/DESIGN.md section 4) and of the model broadcast.

An update (a dict of named float tensors, e.g. ``new_weights - global_weights``) travels as ONE
safetensors blob; nothing on this path uses pickle.

Tensors (safetensors keys), for each parameter ``NAME`` of the update:

* ``bits`` 4 or 8, tensors with 2 or more dimensions (conv/linear weights): ``NAME::codes``,
  uint8 ``[ceil(numel * bits / 8)]``, the signed codes packed by
  :func:`oqfl_ext.ops.quantize_pack` (layout: :func:`oqfl_ext.ops.pack`), and ``NAME::scale``,
  float32 step sizes ``[shape[0]]`` (per output channel, ``axis = 0``). A step size is
  ``max|slice| / qmax`` (qmax 7 or 127); a slice of zeros gets the smallest normal float32 instead
  of 0. Values are recovered as ``code * scale``: the error is at most ``scale / 2`` with
  round-half-to-even, below ``scale`` with (unbiased) stochastic rounding.
* ``bits`` 4 or 8, 0-D and 1-D tensors (biases, normalization statistics, LSQ step sizes and
  offsets): ``NAME::values``, bfloat16 (``axis = null``). One shared int4 step size for a whole
  vector lets the rounding noise of its largest element swamp the small ones (it drove LSQ step
  sizes and BatchNorm variances negative in training); bfloat16 keeps every element to 2^-9
  relative error for 2 bytes each, about 0.09 % of a ResNet-18 update.
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
version, digest, client id, names, shapes and sizes against the receiver's template, scale
shapes and values, and finite float32 values; whatever is wrong raises :class:`UpdateRejected`
(a ValueError) whose message says what, quoting at most a short prefix (60 characters) of any
text taken from the blob. A single changed byte anywhere in a blob, header included, is
rejected.

The model broadcast (server -> clients, :func:`encode_model` / :func:`decode_model`) uses the
same framing, digest and checks with its own format name:

=================  =====================================================================
``format``         ``"oqfl-model"``
``version``        ``"1"``
``bits``           ``"32"`` (``bits=None``) or ``"8"``
``params``         JSON list, in the state's order, of ``{"name", "shape", "dtype", "axis",
                   "encoding"}``; ``encoding`` is ``"f32"`` (``NAME::values``, float32),
                   ``"int8"`` (``NAME::codes`` + ``NAME::scale`` as above, ``axis`` 0) or
                   ``"exact"`` (``NAME::values`` in the entry's own integer/bool dtype:
                   ``num_batches_tracked``, quantizer flags)
``round``          decimal integer >= 0
``codec``          JSON ``{"rounding": "half_even" | "none", "scale": "absmax" | "none",
                   "granularity": ...}``
``digest``         as above
=================  =====================================================================

With ``bits=8`` the floating-point entries with 2 or more dimensions (conv/linear weights) are
int8 codes per output channel with round half to even (deterministic: every client decodes
the same model); 0-D and 1-D floating-point entries (biases, normalization statistics, LSQ step
sizes and offsets: few bytes, and a step size rounded to 0 would break a quantizer) travel as
float32. Entries that are not floating point travel exactly.

Entropy coding (optional, ``compression="zlib"`` on both sides): the blob above is sent as one
zlib stream (RFC 1950, DEFLATE level 6) instead. The int4/int8 codes of an update are far from
uniform (most are small), so DEFLATE's Huffman stage saves a good part of their bytes, and the
JSON header shrinks too (the ResNet-20 updates of docs/RESULTS.md: int4 blobs 32 % smaller, int8
17 %, float32 12 %). :func:`wrap_update` makes the stream. The receiver inflates at most
:func:`update_size_limit` bytes for its template (a larger stream is rejected before it is
inflated further, so a small "zip bomb" cannot exhaust memory) and requires the stream to end
exactly at the end of the data; then the checks above apply to the inflated blob.

Implementation notes (speed): tensors are hashed and framed straight from their memory
(memoryviews, no ``bytes`` copies) into one output buffer; non-finite inputs of a quantized
update are caught by their (per-channel) absmax scale rather than by an extra pass; decoding
copies the blob once and reads every tensor as a view of that copy, and checks float32
overflow of ``code * scale`` from the scales (a pass over the output only for a scale within a
factor 8/7 (int4) or 128/127 (int8) of float32's maximum).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .._io import encode_safetensors, tensor_bytes, tensor_digest

__all__ = ["encode_update", "decode_update", "encode_model", "decode_model", "UpdateRejected",
           "update_size_limit", "wrap_update", "check_compression", "COMPRESSIONS",
           "FORMAT_NAME", "FORMAT_VERSION", "MODEL_FORMAT_NAME", "MODEL_FORMAT_VERSION"]

FORMAT_NAME = "oqfl-update"
FORMAT_VERSION = "1"
MODEL_FORMAT_NAME = "oqfl-model"
MODEL_FORMAT_VERSION = "1"
_BITS = (4, 8, 32)
_QMAX = {4: 7, 8: 127}
_META_KEYS = frozenset({"format", "version", "bits", "params", "round", "client_id",
                        "num_samples", "codec", "digest"})
_MODEL_META_KEYS = frozenset({"format", "version", "bits", "params", "round", "codec",
                              "digest"})
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
# state entries that are not floating point and travel exactly in the model broadcast
_EXACT_DTYPES = {"bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8,
                 "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
_ST_DTYPES = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.bool: "BOOL",
              torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ST_ITEMSIZE = {"U8": 1, "F32": 4, "BF16": 2, "BOOL": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8}
_UPDATE_ST = ("U8", "F32", "BF16")
_MODEL_ST = tuple(k for k in _ST_ITEMSIZE if k != "BF16")
_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = float(torch.finfo(torch.float32).max)
_MAX_HEADER = 64 << 20
_MAX_CLIENT_ID = 256
_QUOTE = 60        # characters of received text a rejection message quotes at most
_MAX_DETAIL = 300  # characters of a foreign exception's text a rejection message keeps
_SUFFIX_CODES, _SUFFIX_SCALE, _SUFFIX_VALUES = "::codes", "::scale", "::values"
COMPRESSIONS = ("none", "zlib")
_ZLIB_LEVEL = 6
_ENC_F32, _ENC_BF16, _ENC_INT8, _ENC_EXACT = "f32", "bf16", "int8", "exact"


class UpdateRejected(ValueError):
    """A received update or model blob is malformed, corrupted or disagrees with the
    receiver's model."""


class _Rejection(UpdateRejected):
    """Raised inside the decoders; the public functions prefix the message with what was
    rejected."""


# ----------------------------------------------------------------------------------------------
# encoding

def _text_problem(value: str) -> Optional[str]:
    """What is wrong with a client id (a str), or None: the encoder's and the decoder's rule."""
    if len(value) > _MAX_CLIENT_ID:
        return f"expected at most {_MAX_CLIENT_ID} characters, got {len(value)}"
    if not value.isprintable():
        return f"must be printable text, got {_quote(value)}"
    return None


def _check_text(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} expected a str, got {type(value).__name__}")
    problem = _text_problem(value)
    if problem:
        raise ValueError(f"{name} {problem}")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} expected a non-negative integer, got {value!r}")
    return value


def _check_entries(what: str, entries) -> None:
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{what} expected a non-empty dict of name -> tensor")
    for name, value in entries.items():
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ValueError(f"{what} names must be non-empty printable strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{what}[{name!r}] expected a Tensor, got {type(value).__name__}")


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _float32(what: str, name: str, value: Tensor) -> Tensor:
    """value as a contiguous float32 tensor (no copy when it is one already)."""
    if _dtype_name(value) not in _DTYPES:
        raise ValueError(f"{what}[{name!r}] expected a floating dtype "
                         f"({', '.join(_DTYPES)}), got {value.dtype}")
    return value.detach().to(torch.float32).contiguous()


def _check_finite(what: str, name: str, x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}[{name!r}] has non-finite values")


def _scales(x: Tensor, bits: int) -> Tensor:
    """float32 step sizes of a float32 tensor with 2 or more dimensions, one per slice along
    axis 0. A NaN or infinite element makes its slice's step size non-finite (amax propagates
    NaN)."""
    n = x.shape[0]
    if x.numel() == 0:
        amax = torch.zeros(n, dtype=torch.float32, device=x.device)
    else:  # max |x| as max(max x, -min x): two reductions, no |x| temporary
        rows = x.reshape(n, -1)
        amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())
    return (amax / _QMAX[bits]).clamp_min(_TINY).to(torch.float32).contiguous()


def _quantize(what: str, name: str, x: Tensor, bits: int, stochastic: bool,
              generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor, Optional[int]]:
    """(packed codes, step sizes, axis 0) of a float32 tensor with 2 or more dimensions, on the
    CPU; ValueError for
    non-finite values (found through the scales: one pass over x fewer)."""
    scale, axis = _scales(x, bits), 0
    if scale.numel() and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{what}[{name!r}] has non-finite values")
    codes = ops.quantize_pack(x, scale, bits=bits, axis=axis, stochastic=stochastic,
                              generator=generator)
    return codes.cpu(), scale.cpu(), axis


def _codec_options(bits: int, stochastic: bool) -> dict:
    if bits == 32:
        return {"rounding": "none", "scale": "none", "granularity": "none"}
    return {"rounding": "stochastic" if stochastic else "half_even", "scale": "absmax",
            "granularity": "per_channel_axis0_for_ndim_ge_2"}


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _digest(meta: Dict[str, str], tensors: Dict[str, Tuple[str, List[int], bytes]]) -> str:
    """The ``digest`` metadata field (:func:`oqfl_ext._io.tensor_digest` in the update/model
    domain)."""
    return tensor_digest(b"oqfl-update-digest", meta, tensors)


def _seal(meta: Dict[str, str], tensors: Dict[str, Tensor]) -> bytes:
    """Adds the digest to ``meta`` and writes the safetensors blob with
    :func:`oqfl_ext._io.encode_safetensors` (compact JSON header with sorted keys, padded with
    spaces to a multiple of 8 bytes, then the tensors' data, widest dtype first, every tensor
    aligned to its item size). The same arguments always give the same bytes."""
    meta["digest"] = _digest(meta, {k: (_ST_DTYPES[t.dtype], list(t.shape), tensor_bytes(t))
                                    for k, t in tensors.items()})
    return encode_safetensors(tensors, meta)


def encode_update(update: Dict[str, Tensor], *, bits: int, round: int = 0, client_id: str = "",
                  num_samples: int = 0, stochastic: bool = True,
                  generator: Optional[torch.Generator] = None,
                  compression: str = "none") -> bytes:
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
        compression: ``"none"`` or ``"zlib"`` (the blob as one zlib stream, see the module
            docstring); the receiver must pass the same to :func:`decode_update`.

    Returns:
        The blob (bytes). Raises ValueError/TypeError for bad arguments or non-finite values.
    """
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits expected one of {_BITS}, got {bits!r}")
    check_compression(compression)
    round = _check_count("round", round)
    num_samples = _check_count("num_samples", num_samples)
    _check_text("client_id", client_id)
    _check_entries("update", update)
    tensors: Dict[str, Tensor] = {}
    params: List[dict] = []
    for name, value in update.items():
        x = _float32("update", name, value)
        entry = {"name": name, "shape": list(x.shape), "dtype": _dtype_name(value), "axis": None}
        if bits == 32:
            _check_finite("update", name, x)
            tensors[name + _SUFFIX_VALUES] = x.cpu()
        elif x.dim() <= 1:
            _check_finite("update", name, x)
            values = x.to(torch.bfloat16)
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"update[{name!r}] has values beyond bfloat16's range "
                                 f"(|x| > {torch.finfo(torch.bfloat16).max:.4g})")
            tensors[name + _SUFFIX_VALUES] = values.cpu()
        else:
            codes, scale, entry["axis"] = _quantize("update", name, x, bits, stochastic,
                                                    generator)
            tensors[name + _SUFFIX_CODES] = codes
            tensors[name + _SUFFIX_SCALE] = scale
        params.append(entry)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bits": str(bits),
        "params": _compact(params),
        "round": str(round),
        "client_id": client_id,
        "num_samples": str(num_samples),
        "codec": json.dumps(_codec_options(bits, stochastic), separators=(",", ":"),
                            sort_keys=True),
    }
    return wrap_update(_seal(meta, tensors), compression)


def check_compression(compression, name: str = "compression") -> None:
    """ValueError naming ``name`` unless ``compression`` is one of :data:`COMPRESSIONS`."""
    if not isinstance(compression, str) or compression not in COMPRESSIONS:
        raise ValueError(f"{name} expected one of {COMPRESSIONS}, got {compression!r}")


def update_size_limit(template: Dict[str, Tensor]) -> int:
    """An upper bound of the size of any valid update blob for ``template``: the largest header
    the decoder accepts (64 MiB) plus float32 values and per-channel scales of every entry.
    How much a receiver inflates at most."""
    _check_template(template)
    data = sum(4 * (t.numel() + (t.shape[0] if t.dim() else 1)) for t in template.values())
    return 8 + _MAX_HEADER + data


def wrap_update(blob: bytes, compression: str) -> bytes:
    """The bytes that travel for an update blob of :func:`encode_update`: the blob itself
    (``"none"``) or one zlib stream of it (``"zlib"``)."""
    check_compression(compression)
    return blob if compression == "none" else zlib.compress(blob, _ZLIB_LEVEL)


def _inflate(data, limit: int) -> bytes:
    """The zlib stream ``data`` inflated, refusing more than ``limit`` bytes of output, an
    unfinished stream or bytes after its end."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        _reject(f"expected bytes, got {type(data).__name__}")
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as e:
        _reject(f"not a valid zlib stream ({e})")
    if d.unconsumed_tail:
        _reject(f"the zlib stream inflates to more than {limit} bytes, the most an update "
                "for this model can take")
    if not d.eof:
        _reject("the zlib stream is truncated")
    if d.unused_data:
        _reject(f"{len(d.unused_data)} bytes after the end of the zlib stream")
    return out


def encode_model(state: Dict[str, Tensor], *, bits: Optional[int] = None,
                 round: int = 0) -> bytes:
    """Serializes a model state (e.g. the global ``state_dict()``) for the server -> client
    broadcast (format: the module docstring).

    Args:
        state: name -> tensor; floating-point entries (float32/16, bfloat16, float64) must be
            finite; other entries may be bool, uint8, int8, int16, int32 or int64 and travel
            exactly. Any device, any strides.
        bits: None (floating-point entries as float32) or 8 (floating-point entries with 2 or
            more dimensions as int8 codes per output channel, round half to even; the others
            as float32).
        round: non-negative integer stored in the metadata.

    Returns:
        The blob (bytes); the same state always gives the same bytes. Raises
        ValueError/TypeError for bad arguments, non-finite values or unsupported dtypes.
    """
    if bits is not None and (isinstance(bits, bool) or bits != 8):
        raise ValueError(f"bits expected None (float32) or 8, got {bits!r}")
    round = _check_count("round", round)
    _check_entries("state", state)
    tensors: Dict[str, Tensor] = {}
    params: List[dict] = []
    for name, value in state.items():
        dtype = _dtype_name(value)
        entry = {"name": name, "shape": list(value.shape), "dtype": dtype, "axis": None,
                 "encoding": _ENC_F32}
        if dtype in _EXACT_DTYPES:
            entry["encoding"] = _ENC_EXACT
            tensors[name + _SUFFIX_VALUES] = value.detach().cpu().contiguous()
        else:
            x = _float32("state", name, value)
            if bits == 8 and x.dim() >= 2 and x.numel():
                codes, scale, entry["axis"] = _quantize("state", name, x, 8, False, None)
                entry["encoding"] = _ENC_INT8
                tensors[name + _SUFFIX_CODES] = codes
                tensors[name + _SUFFIX_SCALE] = scale
            else:
                _check_finite("state", name, x)
                tensors[name + _SUFFIX_VALUES] = x.cpu()
        params.append(entry)
    mbits = 32 if bits is None else 8
    meta = {
        "format": MODEL_FORMAT_NAME,
        "version": MODEL_FORMAT_VERSION,
        "bits": str(mbits),
        "params": _compact(params),
        "round": str(round),
        "codec": json.dumps(_codec_options(mbits, False), separators=(",", ":"),
                            sort_keys=True),
    }
    return _seal(meta, tensors)


# ----------------------------------------------------------------------------------------------
# decoding

def _reject(msg: str):
    raise _Rejection(msg)


def _quote(value) -> str:
    """The repr of a value taken from a received blob, cut to a short prefix: rejection
    messages go into metrics.json and the log every round, so a sender must not be able to
    make them large."""
    if isinstance(value, str) and len(value) > _QUOTE:
        return f"{value[:_QUOTE]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _QUOTE else text[:_QUOTE] + "..."


def _quote_list(items: List[str], n: int = 5) -> str:
    """``[a, b, ...]`` of the first ``n`` items, each through :func:`_quote`."""
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return "[" + ", ".join(_quote(x) for x in items[:n]) + more + "]"


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate JSON key {_quote(k)}")
        seen[k] = v
    return seen


def _parse_framing(blob, allowed=_UPDATE_ST):
    """(metadata dict, {key: (dtype, shape, (begin, end))}, data offset) of a safetensors blob
    (bytes-like), checked to be in the canonical form :func:`_seal` (and safetensors) writes,
    with tensor dtypes among ``allowed``."""
    if len(blob) < 8:
        _reject(f"not a safetensors blob: {len(blob)} bytes, fewer than the 8-byte header size")
    (n,) = struct.unpack("<Q", blob[:8])
    if n < 2 or n > _MAX_HEADER or 8 + n > len(blob):
        _reject(f"not a safetensors blob or truncated: header size {n} with {len(blob)} bytes")
    if n % 8:
        _reject(f"safetensors header size {n} is not a multiple of 8")
    raw = bytes(blob[8:8 + n])
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
            _reject(f"tensor {_quote(key)}: malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in allowed:
            _reject(f"tensor {_quote(key)}: dtype {_quote(dtype)}, expected {' or '.join(allowed)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            _reject(f"tensor {_quote(key)}: malformed shape {_quote(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            _reject(f"tensor {_quote(key)}: malformed data_offsets {_quote(offsets)}")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            _reject(f"tensor {_quote(key)}: {offsets[1] - offsets[0]} data bytes for shape {shape} "
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
        _reject(f"metadata {key!r} is not a non-negative integer: {_quote(v)}")
    return int(v)


def _parse_params(meta: Dict[str, str], bits: int, model: bool = False):
    """[(name, shape, axis, dtype, encoding)] of the ``params`` metadata. Update blobs have no
    ``encoding`` field: theirs is "f32" with bits 32, else "int8" (codes of ``bits`` bits)."""
    try:
        params = json.loads(meta["params"], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        _reject(f"metadata 'params' is not valid JSON ({e})")
    if not isinstance(params, list) or not params:
        _reject("metadata 'params' is not a non-empty list")
    fields = {"name", "shape", "dtype", "axis"} | ({"encoding"} if model else set())
    out = []
    for p in params:
        if not isinstance(p, dict) or set(p) != fields:
            _reject(f"metadata 'params' has a malformed entry: {_quote(p)}")
        name, shape, dtype, axis = p["name"], p["shape"], p["dtype"], p["axis"]
        if not isinstance(name, str) or not name:
            _reject(f"metadata 'params' has a bad name: {_quote(name)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            _reject(f"parameter {_quote(name)}: malformed shape {_quote(shape)}")
        if not isinstance(dtype, str) or (dtype not in _DTYPES and not (
                model and dtype in _EXACT_DTYPES)):
            _reject(f"parameter {_quote(name)}: unknown dtype {_quote(dtype)}")
        if model:
            encoding = p["encoding"]
            allowed = ((_ENC_EXACT,) if dtype in _EXACT_DTYPES
                       else (_ENC_F32, _ENC_INT8) if bits == 8 else (_ENC_F32,))
            if encoding not in allowed:
                _reject(f"parameter {_quote(name)}: encoding {_quote(encoding)} for a {dtype} "
                        f"entry with bits={bits}, expected one of {allowed}")
        else:
            encoding = (_ENC_F32 if bits == 32 else _ENC_BF16 if len(shape) <= 1
                        else _ENC_INT8)
        if encoding != _ENC_INT8:
            if axis is not None:
                _reject(f"parameter {_quote(name)}: axis {_quote(axis)} with {encoding} values")
        elif axis is not None and not (type(axis) is int and 0 <= axis < len(shape)):
            _reject(f"parameter {_quote(name)}: axis {_quote(axis)} out of range for shape "
                    f"{shape}")
        out.append((name, shape, axis, dtype, encoding))
    names = [p[0] for p in out]
    if len(set(names)) != len(names):
        _reject("metadata 'params' lists a parameter twice")
    return out


def _check_template(template) -> None:
    if not isinstance(template, dict) or not all(isinstance(v, Tensor) for v in template.values()):
        raise TypeError("template expected a dict of name -> Tensor")


def _open(blob, template, fmt: str, version: str, keys: frozenset, allowed):
    """Checks a received blob's framing, format, version, metadata keys and digest: (metadata,
    {key: (dtype, shape, data offset, memoryview of the data in a private copy of the blob)})."""
    _check_template(template)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        _reject(f"expected bytes, got {type(blob).__name__}")
    buf = bytearray(blob)  # the one copy: every tensor below is a view of it
    meta, entries, data_start = _parse_framing(buf, allowed)
    if meta.get("format") != fmt:
        _reject(f"format {_quote(meta.get('format'))}, expected {fmt!r}")
    if meta.get("version") != version:
        _reject(f"format version {_quote(meta.get('version'))}, expected {version!r}")
    if set(meta) != keys:
        missing, extra = sorted(keys - set(meta)), sorted(set(meta) - keys)
        _reject(f"metadata keys differ (missing {missing}, unexpected {_quote_list(extra)})")
    view = memoryview(buf)
    tensors = {k: (dt, shape, data_start + b, view[data_start + b:data_start + e])
               for k, (dt, shape, (b, e)) in entries.items()}
    if _digest(meta, {k: (dt, shape, data) for k, (dt, shape, _, data) in tensors.items()}) \
            != meta["digest"]:
        _reject("digest mismatch: the blob was corrupted or altered")
    return meta, tensors


def _parse_codec(meta: Dict[str, str]) -> dict:
    try:
        codec = json.loads(meta["codec"])
    except ValueError as e:
        _reject(f"metadata 'codec' is not valid JSON ({e})")
    if not isinstance(codec, dict):
        _reject("metadata 'codec' is not a JSON object")
    return codec


def _check_names(params, template, what: str) -> None:
    names = [p[0] for p in params]
    if set(names) != set(template):
        missing = sorted(set(template) - set(names))
        extra = sorted(set(names) - set(template))
        _reject(f"{what} names differ from the model's: missing {_quote_list(missing)}, "
                f"unexpected {_quote_list(extra)}")


def _check_keys(params, tensors) -> None:
    expected = set()
    for name, _, _, _, encoding in params:
        if encoding == _ENC_INT8:
            expected.update((name + _SUFFIX_CODES, name + _SUFFIX_SCALE))
        else:
            expected.add(name + _SUFFIX_VALUES)
    if set(tensors) != expected:
        _reject(f"tensors differ from the parameter list: missing "
                f"{_quote_list(sorted(expected - set(tensors)))}, unexpected "
                f"{_quote_list(sorted(set(tensors) - expected))}")


def _view(entry, dtype: torch.dtype, shape: List[int]) -> Tensor:
    """The tensor of a (dtype, shape, offset, memoryview) entry, sharing the blob copy's memory
    when its data is aligned to its item size (as :func:`_seal` writes it), else copied."""
    _, _, offset, data = entry
    if not len(data):
        return torch.zeros(shape, dtype=dtype)
    if offset % torch.empty((), dtype=dtype).element_size():
        data = bytearray(data)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _values(name: str, entry, shape: List[int], st_dtype: str = "F32") -> Tensor:
    """The ``::values`` tensor of a parameter: dtype ``st_dtype`` and the parameter's shape;
    floating-point values must be finite, bool bytes 0 or 1."""
    dt, tshape = entry[0], entry[1]
    if dt != st_dtype or tshape != shape:
        _reject(f"parameter {name!r}: values are {dt} {tshape}, expected {st_dtype} {shape}")
    if st_dtype == "BOOL":
        x = _view(entry, torch.uint8, shape)
        if x.numel() and int(x.max()) > 1:
            _reject(f"parameter {name!r}: bool values other than 0 and 1")
        return x.view(torch.bool)
    x = _view(entry, _ST_TORCH[st_dtype], shape)
    if st_dtype in ("F32", "BF16") and x.numel() and not bool(torch.isfinite(x).all()):
        _reject(f"parameter {name!r}: non-finite values")
    return x


def _dequantized(name: str, tensors, shape: List[int], axis: Optional[int],
                 bits: int) -> Tensor:
    """float32 values of a parameter's ``::codes`` and ``::scale`` tensors, checked."""
    numel = math.prod(shape)
    codes = tensors[name + _SUFFIX_CODES]
    nbytes = (numel * bits + 7) // 8
    if codes[0] != "U8" or codes[1] != [nbytes]:
        _reject(f"parameter {name!r}: packed codes are {codes[0]} {codes[1]}, expected U8 "
                f"[{nbytes}] (ceil({numel} * {bits} / 8))")
    sc = tensors[name + _SUFFIX_SCALE]
    nscale = 1 if axis is None else shape[axis]
    if sc[0] != "F32" or sc[1] != [nscale]:
        _reject(f"parameter {name!r}: scale is {sc[0]} {sc[1]}, expected F32 [{nscale}]")
    scale = _view(sc, torch.float32, [nscale])
    ok = torch.isfinite(scale) & (scale > 0)
    if nscale and not bool(ok.all()):
        _reject(f"parameter {name!r}: scales must be finite and positive, got "
                f"{scale[~ok][:4].tolist()}")
    if not numel:
        return torch.zeros(shape, dtype=torch.float32)
    x = ops.unpack_dequantize(_view(codes, torch.uint8, [nbytes]), scale, bits=bits,
                              shape=shape, axis=axis)
    # |code| <= 2**(bits-1): code * scale can only overflow when this bound exceeds float32's
    # range; only then look at the values (a huge scale times a large code)
    if float(scale.max()) * (1 << (bits - 1)) > _F32_MAX and not bool(torch.isfinite(x).all()):
        _reject(f"parameter {name!r}: scale too large, code * scale overflows float32")
    return x


def _guarded(kind: str, fn, *args):
    """Runs a decoder: a rejection gets ``kind`` in its message; any other parsing failure is
    a rejection too, never a crash. (TypeError for a bad template passes through.)"""
    try:
        return fn(*args)
    except _Rejection as e:
        raise UpdateRejected(f"{kind} rejected: {e}") from None
    except TypeError as e:
        if str(e).startswith("template expected"):
            raise
        raise UpdateRejected(f"{kind} rejected: malformed blob ({type(e).__name__}: "
                             f"{str(e)[:_MAX_DETAIL]})") from e
    except Exception as e:
        raise UpdateRejected(f"{kind} rejected: malformed blob ({type(e).__name__}: "
                             f"{str(e)[:_MAX_DETAIL]})") from e


def decode_update(blob: bytes, template: Dict[str, Tensor], *,
                  return_info: bool = False, compression: str = "none"):
    """Checks and decodes a blob of :func:`encode_update` against the receiver's model.

    Args:
        blob: the bytes received (bytes, bytearray or memoryview).
        template: name -> tensor of the global model (e.g. its ``state_dict()`` restricted to
            the parameters clients send): the blob must carry exactly these names with these
            shapes.
        return_info: also return a dict ``{"round", "client_id", "num_samples", "bits",
            "codec"}`` of the blob's metadata.
        compression: what the sender's :func:`encode_update` was given (``"none"`` or
            ``"zlib"``).

    Returns:
        name -> float32 tensor with the template's shape, on the template tensor's device, in
        the template's order (and the info dict with ``return_info``).

    Raises:
        UpdateRejected: the blob is not a valid update for this template; the message says why.
            Nothing is returned in part.
        TypeError: ``template`` is not a dict of tensors (a caller error, not a bad blob).
        ValueError: ``compression`` is not one of :data:`COMPRESSIONS` (a caller error too).
    """
    check_compression(compression)
    return _guarded("update", _decode_update, blob, template, return_info, compression)


def _decode_update(blob, template: Dict[str, Tensor], return_info: bool,
                   compression: str = "none"):
    if compression == "zlib":
        _check_template(template)
        blob = _inflate(blob, update_size_limit(template))
    meta, tensors = _open(blob, template, FORMAT_NAME, FORMAT_VERSION, _META_KEYS, _UPDATE_ST)
    if meta["bits"] not in ("4", "8", "32"):
        _reject(f"bits {_quote(meta['bits'])}, expected 4, 8 or 32")
    bits = int(meta["bits"])
    problem = _text_problem(meta["client_id"])
    if problem:
        _reject(f"metadata 'client_id' {problem}")
    round_, num_samples = _parse_int(meta, "round"), _parse_int(meta, "num_samples")
    params = _parse_params(meta, bits)
    codec = _parse_codec(meta)
    _check_names(params, template, "parameter")
    _check_keys(params, tensors)

    decoded: Dict[str, Tensor] = {}
    for name, shape, axis, _, encoding in params:
        want = list(template[name].shape)
        if shape != want:
            _reject(f"parameter {name!r}: shape {shape}, the model has {want}")
        if encoding == _ENC_F32:
            decoded[name] = _values(name, tensors[name + _SUFFIX_VALUES], shape)
        elif encoding == _ENC_BF16:
            decoded[name] = _values(name, tensors[name + _SUFFIX_VALUES], shape, "BF16").float()
        else:
            decoded[name] = _dequantized(name, tensors, shape, axis, bits)
    out = {name: decoded[name].to(template[name].device) for name in template}
    if return_info:
        return out, {"round": round_, "client_id": meta["client_id"],
                     "num_samples": num_samples, "bits": bits, "codec": codec}
    return out


def decode_model(blob: bytes, template: Dict[str, Tensor], *, return_info: bool = False):
    """Checks and decodes a blob of :func:`encode_model` against the receiver's model.

    Args:
        blob: the bytes received (bytes, bytearray or memoryview).
        template: name -> tensor, e.g. the client's ``model.state_dict()``: the blob must carry
            exactly these names with these shapes; an entry that is not floating point must
            have the template's dtype, a floating-point one a floating-point template entry.
        return_info: also return ``{"round", "bits", "codec"}`` (bits: 8, or None for float32).

    Returns:
        name -> tensor in the template's order, on its device and in its dtype (floating-point
        entries converted from float32; the others exactly as sent), ready for
        ``load_state_dict`` (and the info dict with ``return_info``).

    Raises:
        UpdateRejected: the blob is not a valid model for this template; the message says why.
        TypeError: ``template`` is not a dict of tensors.
    """
    return _guarded("model", _decode_model, blob, template, return_info)


def _decode_model(blob, template: Dict[str, Tensor], return_info: bool):
    meta, tensors = _open(blob, template, MODEL_FORMAT_NAME, MODEL_FORMAT_VERSION,
                          _MODEL_META_KEYS, _MODEL_ST)
    if meta["bits"] not in ("8", "32"):
        _reject(f"bits {_quote(meta['bits'])}, expected 8 or 32")
    bits = int(meta["bits"])
    round_ = _parse_int(meta, "round")
    params = _parse_params(meta, bits, model=True)
    codec = _parse_codec(meta)
    _check_names(params, template, "state entry")
    _check_keys(params, tensors)

    decoded: Dict[str, Tensor] = {}
    for name, shape, axis, dtype, encoding in params:
        t = template[name]
        want = list(t.shape)
        if shape != want:
            _reject(f"entry {name!r}: shape {shape}, the model has {want}")
        if encoding == _ENC_EXACT:
            if t.dtype != _EXACT_DTYPES[dtype]:
                _reject(f"entry {name!r}: dtype {dtype}, the model has {t.dtype}")
            x = _values(name, tensors[name + _SUFFIX_VALUES], shape,
                        _ST_DTYPES[_EXACT_DTYPES[dtype]])
        else:
            if not t.is_floating_point():
                _reject(f"entry {name!r}: floating-point values for a {t.dtype} entry of the "
                        "model")
            if encoding == _ENC_F32:
                x = _values(name, tensors[name + _SUFFIX_VALUES], shape)
            else:
                x = _dequantized(name, tensors, shape, axis, bits)
        decoded[name] = x
    out = {name: decoded[name].to(template[name].device, template[name].dtype)
           for name in template}
    if return_info:
        return out, {"round": round_, "bits": None if bits == 32 else bits, "codec": codec}
    return out
