"""Wire formats of a federated client update (docs/DESIGN.md section 4) and of the model broadcast.

An update (a dict of named float tensors, e.g. ``new_weights - global_weights``) travels as ONE
version 2 blob; nothing on this path uses pickle. Sender and receiver both hold the model, so
the blob names no parameter: it carries a digest of the template (names, shapes, how each entry
travels) and the values as one buffer per kind, every entry in sorted-name order.

How an entry travels:

* ``bits`` 4 or 8, 2 or more dimensions (conv/linear weights): signed codes packed by
  :func:`oqfl_ext.ops.quantize_pack` (layout: :func:`oqfl_ext.ops.pack`), ``ceil(numel * bits /
  8)`` bytes, and float32 step sizes, one per output channel (``shape[0]``, axis 0). A step size
  is ``max|slice| / qmax`` (qmax 7 or 127); a slice of zeros gets the smallest normal float32
  instead of 0. Values are recovered as ``code * step``: the error is at most ``step / 2`` with
  round-half-to-even, below ``step`` with (unbiased) stochastic rounding.
* ``bits`` 4 or 8, 0-D and 1-D (biases, normalization statistics, LSQ step sizes and offsets):
  bfloat16 values. One shared int4 step size for a whole vector lets the rounding noise of its
  largest element swamp the small ones (it drove LSQ step sizes and BatchNorm variances
  negative in training); bfloat16 keeps every element to 2^-9 relative error for 2 bytes each,
  about 0.09 % of a ResNet-18 update.
* ``bits`` 32: float32 values.

Layout (little-endian):

==========  =========================================================================
4 bytes     magic ``b"OQFU"``
u8          version, 2
u8          bits: 4, 8 or 32
u8          rounding: 0 none (bits 32), 1 half to even, 2 stochastic
u8          reserved, 0
u64         round
u64         num_samples (the FedAvg weight)
32 bytes    template digest: SHA-256 over ``b"oqfl-update-template-v2\\0"``, the bits byte,
            then per entry in sorted-name order ``u64 len(name) name(UTF-8) u8 kind u64 ndim
            u64 dims`` (kind 0 float32, 1 bfloat16, 2 codes + steps)
u16         n, bytes of the client id (at most 1024)
n bytes     client id, UTF-8 (printable, at most 256 characters)
0-7 bytes   zeros, up to a multiple of 8
steps       float32 step sizes of every coded entry, back to back
vectors     bfloat16 (bits 4/8) or float32 (bits 32) values of the other entries
codes       packed codes of every coded entry, each starting on a byte
32 bytes    SHA-256 of everything before it
==========  =========================================================================

Everything but the header's 58 bytes (plus the client id and padding) and the final 32 is a
code, a step or a value, so a blob is its payload plus about 100 bytes whatever the model.

Decoding (:func:`decode_update`) checks, in this order: the magic (a version 1 blob, the
safetensors format of earlier releases, is refused with a message saying so: both sides run
the same package, so one format is kept), the version, the final digest (a single changed or
missing byte anywhere is rejected), bits, rounding, reserved byte, client id (length, UTF-8,
printable), the template digest against the receiver's model (a blob made for other names or
shapes is refused), zero padding, the exact size the template implies, step sizes finite and
positive, values finite, and float32 overflow of ``code * step`` (a pass over the output only
for a step within a factor 8/7 (int4) or 128/127 (int8) of float32's maximum). Whatever is
wrong raises :class:`UpdateRejected` (a ValueError) whose message says what, quoting at most a
short prefix (60 characters) of any text taken from the blob. Decoding copies the blob once and
reads every buffer as a view of that copy.

The model broadcast (server -> clients, :func:`encode_model` / :func:`decode_model`) is one
safetensors blob (written by :func:`oqfl_ext._io.encode_safetensors`) with tensors
``NAME::values``, or ``NAME::codes`` (uint8, packed as above) and ``NAME::scale`` (float32
step sizes per output channel), and string metadata, every key required and no other allowed:

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
``digest``         ``"sha256:" + hex`` of SHA-256 over every other metadata field (canonical
                   JSON, sorted keys) and, for every tensor in name order, its name, dtype,
                   shape and raw bytes
=================  =====================================================================

:func:`decode_model` checks the safetensors framing itself (header length, JSON, canonical
compact encoding, offsets that tile the data exactly, no trailing bytes), the format, version,
metadata keys, digest, names, shapes, dtypes and sizes against the receiver's template, step
sizes and finite values, with the same rejections as updates.

With ``bits=8`` the floating-point entries with 2 or more dimensions (conv/linear weights) are
int8 codes per output channel with round half to even (deterministic: every client decodes
the same model); 0-D and 1-D floating-point entries (biases, normalization statistics, LSQ step
sizes and offsets: few bytes, and a step size rounded to 0 would break a quantizer) travel as
float32. Entries that are not floating point travel exactly.

Entropy coding (``compression`` on both sides; :data:`DEFAULT_COMPRESSION` ``"zstd"``): the
update blob travels as one Zstandard frame (level 1, its content size in the frame header, no
dictionary), or as one zlib stream (RFC 1950, DEFLATE level 6) with ``"zlib"``, or as it is with
``"none"``. The int4/int8 codes of an update are far from uniform (most are small), so the
literal entropy coder saves a good part of their bytes (about a quarter of an int4 update); on
such data Zstandard level 1 is as small as DEFLATE and 10-20x faster (``bench/codec_sizes.py``).
:func:`wrap_update` makes the stream; given the blob's :func:`update_layout` it starts a zstd
block at each part (header and steps, vectors, codes, digest), so each part's literals get their
own Huffman table (2-3 % smaller on real updates; the frame is read as any other). The receiver decompresses at most
:func:`update_size_limit` bytes for its template: a zstd frame must state a content size within
it before anything is decompressed, a zlib stream is cut off there, so a small "bomb" cannot
exhaust memory; the stream must end exactly at the end of the data; then the checks above apply
to the decompressed blob.

Implementation notes (speed; ``bench/report_codec.py`` times each stage): the encoder allocates
the whole blob once and writes every part in place (step sizes as ``max(amax, -amin)`` per
slice, two vectorized reductions; vectors converted by ``copy_`` into their bfloat16 region;
each entry's codes from one ``quantize_pack`` call); steps and vectors are checked for
non-finite values in one pass per buffer (a NaN or inf input makes its step non-finite), the
entry to blame looked up only on failure. Zstandard contexts are kept per thread and compress
with as many workers as torch has threads (the frame's bytes do not depend on it). The
receiver decompresses a large frame step by step into its one buffer while a second thread
computes the SHA-256 of what is already out, so the digest check costs almost no time of its
own; every tensor it reads is a view of that buffer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import threading
import zlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .._checks import check_int
from .._io import encode_safetensors, tensor_bytes, tensor_digest

__all__ = ["encode_update", "decode_update", "encode_model", "decode_model", "UpdateRejected",
           "update_size_limit", "update_layout", "wrap_update", "unwrap_update", "check_compression", "COMPRESSIONS",
           "FORMAT_NAME", "FORMAT_VERSION", "MODEL_FORMAT_NAME", "MODEL_FORMAT_VERSION"]

FORMAT_NAME = "oqfl-update"
FORMAT_VERSION = "2"
MODEL_FORMAT_NAME = "oqfl-model"
MODEL_FORMAT_VERSION = "1"
_BITS = (4, 8, 32)
_QMAX = {4: 7, 8: 127}
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
_MODEL_ST = tuple(k for k in _ST_ITEMSIZE if k != "BF16")
_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = float(torch.finfo(torch.float32).max)
_MAX_HEADER = 64 << 20
_MAX_CLIENT_ID = 256
_QUOTE = 60        # characters of received text a rejection message quotes at most
_MAX_DETAIL = 300  # characters of a foreign exception's text a rejection message keeps
_SUFFIX_CODES, _SUFFIX_SCALE, _SUFFIX_VALUES = "::codes", "::scale", "::values"
COMPRESSIONS = ("none", "zlib", "zstd")
# Zstandard level 1: on int4/int8 codes it compresses as well as level 3 or DEFLATE (the literal
# entropy coder does the work; there are few matches) at 10-20x DEFLATE's speed
# (docs/RESULTS.md "Where the uplink bytes go")
DEFAULT_COMPRESSION = "zstd"
_ZLIB_LEVEL = 6
_ZSTD_LEVEL = 1
_ENC_F32, _ENC_INT8, _ENC_EXACT = "f32", "int8", "exact"
# version 2 update blobs (module docstring)
_MAGIC = b"OQFU"
# magic, version, bits, rounding, reserved, round, num_samples, template digest, client id bytes
_HEAD = struct.Struct("<4sBBBBQQ32sH")
_DIGEST_SIZE = 32
_MAX_CLIENT_ID_BYTES = 4 * _MAX_CLIENT_ID
_KIND_F32, _KIND_BF16, _KIND_CODES = 0, 1, 2
_ROUND_NONE, _ROUND_EVEN, _ROUND_STOCH = 0, 1, 2
_ROUNDINGS = (_ROUND_NONE, _ROUND_EVEN, _ROUND_STOCH)
_TEMPLATE_DOMAIN = b"oqfl-update-template-v2\0"
_LOCAL = threading.local()  # per-thread Zstandard contexts


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
    return check_int(name, value, minimum=0)


def _check_u64(name: str, value) -> int:
    return check_int(name, value, minimum=0, maximum=(1 << 64) - 1)


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


def _absmax(x: Tensor) -> Tensor:
    """max |slice| of a float32 tensor with 2 or more dimensions, one per slice along axis 0.
    A NaN or infinite element makes its slice's value non-finite (amax propagates NaN)."""
    n = x.shape[0]
    if x.numel() == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        return torch.ops.oqfl._row_absmax(x)  # one pass (csrc/cpu/packing_cpu.cpp)
    # max(max x, -min x): two vectorized reductions, no |x| temporary (one-pass alternatives
    # are slower: vector_norm(inf) and aminmax take about 6x as long)
    rows = x.reshape(n, -1)
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())


def _steps_from_absmax(amax: Tensor, bits: int) -> Tensor:
    """Step sizes ``max(amax / qmax, smallest normal float32)``, computed in place."""
    return amax.div_(_QMAX[bits]).clamp_min_(_TINY)


def _scales(x: Tensor, bits: int) -> Tensor:
    """float32 step sizes of a float32 tensor with 2 or more dimensions, one per slice along
    axis 0 (non-finite for a slice with a NaN or infinite element)."""
    return _steps_from_absmax(_absmax(x), bits)


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


def _kind(bits: int, ndim: int) -> int:
    """How an entry of an update travels: float32 values (bits 32), bfloat16 values (0-D/1-D)
    or packed codes with per-channel steps (2 or more dimensions)."""
    return _KIND_F32 if bits == 32 else _KIND_BF16 if ndim <= 1 else _KIND_CODES


def _layout(shapes, bits: int):
    """Where each entry of an update lives in a version 2 payload, from the (name, shape)
    pairs both sides know: ``(entries, (steps, vectors, codes) byte sizes, template digest)``.
    ``entries`` is in canonical (sorted name) order, each ``(name, shape, kind, step offset,
    vector offset, code offset)`` with offsets relative to the start of their buffer (steps in
    float32 elements, vectors in elements of their dtype, codes in bytes); shapes are tuples.
    Cached: every update of a run has the same template (read-only results)."""
    return _layout_of(tuple((name, tuple(shape)) for name, shape in shapes), bits)


@functools.lru_cache(maxsize=64)
def _layout_of(shapes, bits: int):
    h = hashlib.sha256(_TEMPLATE_DOMAIN + bytes([bits]))
    entries, steps, vectors, codes = [], 0, 0, 0
    for name, shape in sorted(shapes, key=lambda e: e[0]):
        kind = _kind(bits, len(shape))
        key = name.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<Q", len(key)) + key + bytes([kind])
                 + struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))
        entries.append((name, shape, kind, steps, vectors, codes))
        numel = math.prod(shape)
        if kind == _KIND_CODES:
            steps += shape[0]
            codes += (numel * bits + 7) // 8
        else:
            vectors += numel
    vsize = 4 if bits == 32 else 2
    return entries, (4 * steps, vsize * vectors, codes), h.digest()


def _header(bits: int, rounding: int, round_: int, num_samples: int, tdigest: bytes,
            client_id: bytes) -> bytes:
    head = _HEAD.pack(_MAGIC, int(FORMAT_VERSION), bits, rounding, 0, round_, num_samples,
                      tdigest, len(client_id)) + client_id
    return head + bytes(-len(head) % 8)


def encode_update(update: Dict[str, Tensor], *, bits: int, round: int = 0, client_id: str = "",
                  num_samples: int = 0, stochastic: bool = True,
                  generator: Optional[torch.Generator] = None,
                  compression: str = DEFAULT_COMPRESSION) -> bytes:
    """Serializes a client update into one version 2 blob (format: the module docstring).

    Args:
        update: parameter name -> float tensor (float32/16, bfloat16 or float64; any device,
            any strides). Values must be finite.
        bits: 4 or 8 (signed codes with per-channel float32 step sizes, bfloat16 vectors) or
            32 (float32 values as they are).
        round, num_samples: integers in [0, 2**64) stored in the header.
        client_id: printable text (at most 256 characters).
        stochastic: unbiased stochastic rounding (True) or round half to even (False);
            ignored with bits=32.
        generator: the generator stochastic rounding draws its seeds from (one per parameter
            with 2 or more dimensions, in the update's order, see
            :func:`oqfl_ext.ops.quantize_pack`); None: the default generator.
        compression: one of :data:`COMPRESSIONS` (see the module docstring); the receiver
            must pass the same to :func:`decode_update`.

    Returns:
        The blob (bytes). Raises ValueError/TypeError for bad arguments or non-finite values.
    """
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits expected one of {_BITS}, got {bits!r}")
    check_compression(compression)
    round = _check_u64("round", round)
    num_samples = _check_u64("num_samples", num_samples)
    _check_text("client_id", client_id)
    _check_entries("update", update)
    entries, (nsteps, nvectors, ncodes), tdigest = _layout(
        [(k, list(v.shape)) for k, v in update.items()], bits)
    rounding = _ROUND_NONE if bits == 32 else (_ROUND_STOCH if stochastic else _ROUND_EVEN)
    head = _header(bits, rounding, round, num_samples, tdigest, client_id.encode("utf-8"))
    # the whole blob in one buffer: every entry is written (or converted) straight into its place
    out = torch.empty(len(head) + nsteps + nvectors + ncodes + _DIGEST_SIZE, dtype=torch.uint8)
    mem = memoryview(out.numpy())
    mem[:len(head)] = head
    code_start = len(head) + nsteps + nvectors
    steps = out[len(head):len(head) + nsteps].view(torch.float32)
    vtype = torch.float32 if bits == 32 else torch.bfloat16
    vectors = out[len(head) + nsteps:code_start].view(vtype)
    where = {name: (kind, s, v, c) for name, _, kind, s, v, c in entries}
    xs = {name: _float32("update", name, value) for name, value in update.items()}
    # pass 1: every step size and vector value into its place, then one finiteness check per
    # buffer (a NaN or inf input makes its step non-finite)
    for name, x in xs.items():
        kind, s, v, _ = where[name]
        if kind == _KIND_CODES:
            steps[s:s + x.shape[0]].copy_(_absmax(x))
        else:
            vectors[v:v + x.numel()].copy_(x.reshape(-1))
    if bits != 32:
        _steps_from_absmax(steps, bits)
    if not (bool(torch.isfinite(steps).all()) and bool(torch.isfinite(vectors).all())):
        _raise_non_finite(xs, where, steps, vectors)
    # pass 2: quantize in the update's order (the generator's draws do not depend on the layout)
    for name, x in xs.items():
        kind, s, _, c = where[name]
        if kind == _KIND_CODES:
            scale = steps[s:s + x.shape[0]].to(x.device)
            codes = ops.quantize_pack(x, scale, bits=bits, axis=0, stochastic=stochastic,
                                      generator=generator)
            # a plain memcpy (no parallel region: each costs a scheduler tick on a busy machine)
            mem[code_start + c:code_start + c + codes.numel()] = codes.cpu().numpy()
    starts = (len(head) + nsteps, code_start, len(mem) - _DIGEST_SIZE)
    if compression == "zstd" and len(mem) >= _HASH_ASIDE:
        # the SHA-256 on the hasher thread while everything before it is compressed
        digest = _hasher().submit(lambda: hashlib.sha256(mem[:-_DIGEST_SIZE]).digest())
        return _zstd_frame(mem, starts, digest)
    mem[-_DIGEST_SIZE:] = hashlib.sha256(mem[:-_DIGEST_SIZE]).digest()
    return _zstd_frame(mem, starts) if compression == "zstd" else wrap_update(mem, compression)


def _raise_non_finite(xs: Dict[str, Tensor], where, steps: Tensor, vectors: Tensor) -> None:
    """The ValueError for the first entry (in the update's order) with a non-finite input or
    a value beyond bfloat16's range (the slow path of a failed finiteness check)."""
    for name, x in xs.items():
        kind, s, v, _ = where[name]
        if kind == _KIND_CODES:
            if not bool(torch.isfinite(steps[s:s + x.shape[0]]).all()):
                raise ValueError(f"update[{name!r}] has non-finite values")
            continue
        _check_finite("update", name, x)
        if not bool(torch.isfinite(vectors[v:v + x.numel()]).all()):
            raise ValueError(f"update[{name!r}] has values beyond bfloat16's range "
                             f"(|x| > {torch.finfo(torch.bfloat16).max:.4g})")


def check_compression(compression, name: str = "compression") -> None:
    """ValueError naming ``name`` unless ``compression`` is one of :data:`COMPRESSIONS`."""
    if not isinstance(compression, str) or compression not in COMPRESSIONS:
        raise ValueError(f"{name} expected one of {COMPRESSIONS}, got {compression!r}")


def update_layout(template: Dict[str, Tensor], bits: int, client_id: str = "") -> Dict[str, int]:
    """Bytes of an uncompressed update blob for ``template`` and ``bits``, by part: ``header``
    (fixed fields, client id, padding), ``steps``, ``vectors``, ``codes``, ``digest``, and
    ``total`` (the blob's length). Sizes do not depend on the values."""
    _check_template(template)
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits expected one of {_BITS}, got {bits!r}")
    _check_text("client_id", client_id)
    _, (steps, vectors, codes), _ = _layout([(k, list(v.shape)) for k, v in template.items()],
                                            bits)
    head = _HEAD.size + len(client_id.encode("utf-8"))
    parts = {"header": head + (-head % 8), "steps": steps, "vectors": vectors, "codes": codes,
             "digest": _DIGEST_SIZE}
    parts["total"] = sum(parts.values())
    return parts


def update_size_limit(template: Dict[str, Tensor]) -> int:
    """The size of the largest valid update blob for ``template`` (the longest client id, the
    larger of the 32-bit and the quantized payloads): how much a receiver decompresses at
    most."""
    _check_template(template)
    shapes = [(k, list(v.shape)) for k, v in template.items()]
    payload = max(sum(_layout(shapes, bits)[1]) for bits in _BITS)
    head = _HEAD.size + _MAX_CLIENT_ID_BYTES
    return head + (-head % 8) + payload + _DIGEST_SIZE


def wrap_update(blob: bytes, compression: str, layout: Optional[Dict[str, int]] = None) -> bytes:
    """The bytes that travel for an uncompressed update blob (``compression="none"``): the
    blob itself (``"none"``) or its compressed stream.

    ``layout``: the blob's :func:`update_layout` (optional). With it a zstd frame starts a new
    block at each part (header and steps, vectors, codes, digest), so each part's literals get
    a Huffman table of their own: 2-3 % smaller on real updates (``bench/codec_real_updates.py``);
    the frame is the same kind, read the same way."""
    check_compression(compression)
    if compression == "zlib":
        return zlib.compress(blob, _ZLIB_LEVEL)
    if compression == "zstd":
        starts = ()
        if layout is not None:
            if layout.get("total") != len(blob):
                raise ValueError(f"layout expected the update_layout of this {len(blob)}-byte "
                                 f"blob, got one of {layout.get('total')} bytes")
            steps = layout["header"] + layout["steps"]
            starts = (steps, steps + layout["vectors"], len(blob) - layout["digest"])
        return _zstd_frame(memoryview(blob).cast("B"), starts)
    return blob if isinstance(blob, bytes) else bytes(blob)


def _zstd_frame(mem: memoryview, starts=(), digest=None) -> bytes:
    """One Zstandard frame of ``mem``, a new block at each offset of ``starts``. ``digest``:
    a future of the blob's last 32 bytes (its SHA-256, computed beside the compression), set
    into ``mem`` before they are compressed (the last offset of ``starts`` is theirs)."""
    c = _zstd_compressor().compressobj(size=len(mem))
    out, pos = [], 0
    try:
        for start in starts:
            if start > pos:
                out += [c.compress(mem[pos:start]), c.flush(_zstd().COMPRESSOBJ_FLUSH_BLOCK)]
                pos = start
    finally:
        if digest is not None:
            mem[-_DIGEST_SIZE:] = digest.result()
    out += [c.compress(mem[pos:]), c.flush()]
    return b"".join(out)


def _zstd_compressor():
    """This thread's Zstandard compressor (a context is not thread-safe; kept, with its worker
    threads, for the next blob): one frame with its content size, which the receiver checks
    before it decompresses; as many workers as torch has threads (the frame's bytes do not
    depend on the number of workers)."""
    workers = torch.get_num_threads()
    workers = workers if workers > 1 else 0
    cache = _LOCAL.__dict__.setdefault("zstd", {})
    if workers not in cache:
        cache[workers] = _zstd().ZstdCompressor(level=_ZSTD_LEVEL, threads=workers,
                                                write_content_size=True, write_checksum=False)
    return cache[workers]


def unwrap_update(data, compression: str, limit: int) -> bytes:
    """The inverse of :func:`wrap_update`: the blob inside ``data``. A compressed stream is
    decompressed to at most ``limit`` bytes; a larger, truncated or corrupted stream, or bytes
    after its end, raise UpdateRejected."""
    check_compression(compression)
    if compression == "none":
        return data if isinstance(data, bytes) else bytes(data)
    return _decompress(data, compression, limit)


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - a requirement (requirements.txt)
        raise RuntimeError("compression 'zstd' needs the zstandard package "
                           "(pip install zstandard)") from e
    return zstandard


def _decompress(data, compression: str, limit: int) -> bytes:
    """The stream ``data`` decompressed, refusing more than ``limit`` bytes of output, an
    unfinished stream or bytes after its end."""
    if compression == "zstd":
        return _unzstd(data, limit)
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


def _zstd_frame_size(zstd, data, limit: int) -> int:
    """The content size a Zstandard frame's header states, checked before anything is
    decompressed: stated, at most ``limit``, no dictionary."""
    try:
        params = zstd.get_frame_parameters(data)
    except zstd.ZstdError as e:
        _reject(f"not a valid zstd frame ({e})")
    if params.content_size == zstd.CONTENTSIZE_UNKNOWN:
        _reject("the zstd frame does not state its content size")
    if params.content_size > limit:
        _reject(f"the zstd frame decompresses to {params.content_size} bytes, more than the "
                f"{limit} an update for this model can take")
    if params.dict_id:
        _reject(f"the zstd frame needs dictionary {params.dict_id}; none is used")
    return params.content_size


def _zstd_decompressor(zstd):
    if not hasattr(_LOCAL, "unzstd"):
        _LOCAL.unzstd = zstd.ZstdDecompressor()
    return _LOCAL.unzstd


def _unzstd(data, limit: int) -> bytes:
    """One Zstandard frame decompressed: its header must state a content size of at most
    ``limit`` (checked before anything is allocated; the library checks the frame against
    it), no dictionary, nothing after the frame."""
    zstd = _zstd()
    size = _zstd_frame_size(zstd, data, limit)
    try:
        out = _zstd_decompressor(zstd).decompress(data, allow_extra_data=False)
    except zstd.ZstdError as e:
        _reject(f"the zstd frame is truncated or corrupted ({e})")
    if len(out) != size:
        _reject("the zstd frame's content size is wrong")
    return out


# compressed bytes per step of the hashed decompression; blobs below _HASH_ASIDE bytes are
# hashed after decompression, on the calling thread
_UNZSTD_STEP = 1 << 19
_HASH_ASIDE = 1 << 20
_HASHER = []  # the one worker thread that hashes beside the decompression (started on use)
_HASHER_LOCK = threading.Lock()


def _hasher():
    with _HASHER_LOCK:
        if not _HASHER:
            from concurrent.futures import ThreadPoolExecutor
            _HASHER.append(ThreadPoolExecutor(1, thread_name_prefix="oqfl-codec-sha256"))
        return _HASHER[0]


def _unzstd_hashed(data, limit: int) -> Tuple[bytearray, bytes]:
    """Like :func:`_unzstd` (same checks), into a bytearray, with the SHA-256 of all but its
    last 32 bytes (the blob's digest field). A large frame is decompressed step by step while
    another thread hashes what is already out (both release the GIL): the digest costs
    almost no time of its own."""
    zstd = _zstd()
    size = _zstd_frame_size(zstd, data, limit)
    out = bytearray(size)
    view = memoryview(out)
    hashed = max(size - _DIGEST_SIZE, 0)
    h = hashlib.sha256()
    aside = size >= _HASH_ASIDE
    pending = []
    src = memoryview(data).cast("B")
    dobj = _zstd_decompressor(zstd).decompressobj()
    pos = consumed = 0
    try:
        while consumed < len(src) and not dobj.eof:
            piece = dobj.decompress(src[consumed:consumed + _UNZSTD_STEP])
            consumed += _UNZSTD_STEP
            if pos + len(piece) > size:
                _reject("the zstd frame's content size is wrong")
            view[pos:pos + len(piece)] = piece
            if aside and min(pos + len(piece), hashed) > pos:
                pending.append(_hasher().submit(h.update, view[pos:min(pos + len(piece),
                                                                         hashed)]))
            pos += len(piece)
    except zstd.ZstdError as e:
        _reject(f"the zstd frame is truncated or corrupted ({e})")
    finally:
        for f in pending:  # in order on the one worker; wait even when rejecting
            f.result()
    if not dobj.eof:
        _reject("the zstd frame is truncated or corrupted (no end of frame)")
    if dobj.unused_data or consumed < len(src):
        _reject(f"{len(dobj.unused_data) + max(len(src) - consumed, 0)} bytes after the end "
                "of the zstd frame")
    if pos != size:
        _reject("the zstd frame's content size is wrong")
    if not aside:
        h.update(view[:hashed])
    return out, h.digest()


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


def _parse_framing(blob, allowed):
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


def _parse_params(meta: Dict[str, str], bits: int):
    """[(name, shape, axis, dtype, encoding)] of a model blob's ``params`` metadata."""
    try:
        params = json.loads(meta["params"], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        _reject(f"metadata 'params' is not valid JSON ({e})")
    if not isinstance(params, list) or not params:
        _reject("metadata 'params' is not a non-empty list")
    fields = {"name", "shape", "dtype", "axis", "encoding"}
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
        if not isinstance(dtype, str) or (dtype not in _DTYPES and dtype not in _EXACT_DTYPES):
            _reject(f"parameter {_quote(name)}: unknown dtype {_quote(dtype)}")
        encoding = p["encoding"]
        allowed = ((_ENC_EXACT,) if dtype in _EXACT_DTYPES
                   else (_ENC_F32, _ENC_INT8) if bits == 8 else (_ENC_F32,))
        if encoding not in allowed:
            _reject(f"parameter {_quote(name)}: encoding {_quote(encoding)} for a {dtype} "
                    f"entry with bits={bits}, expected one of {allowed}")
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
                  return_info: bool = False, compression: str = DEFAULT_COMPRESSION):
    """Checks and decodes a blob of :func:`encode_update` against the receiver's model.

    Args:
        blob: the bytes received (bytes, bytearray or memoryview).
        template: name -> tensor of the global model (e.g. its ``state_dict()`` restricted to
            the parameters clients send): the blob must carry exactly these names with these
            shapes.
        return_info: also return a dict ``{"round", "client_id", "num_samples", "bits",
            "codec"}`` of the blob's header (``codec``: ``{"rounding", "scale",
            "granularity"}`` as in version 1).
        compression: what the sender's :func:`encode_update` was given (one of
            :data:`COMPRESSIONS`; default ``"zstd"``).

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
                   compression: str = DEFAULT_COMPRESSION):
    _check_template(template)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        _reject(f"expected bytes, got {type(blob).__name__}")
    digest = None  # SHA-256 of all but the last 32 bytes, when found while decompressing
    if compression == "zstd":
        buf, digest = _unzstd_hashed(blob, update_size_limit(template))
    else:
        if compression != "none":
            blob = _decompress(blob, compression, update_size_limit(template))
        buf = bytearray(blob)  # the one copy: every tensor below is a view of it
    if len(buf) < _HEAD.size + _DIGEST_SIZE:
        _not_v2(buf)
        _reject(f"truncated: {len(buf)} bytes, fewer than the {_HEAD.size + _DIGEST_SIZE} of "
                "an empty update")
    (magic, version, bits, rounding, reserved, round_, num_samples, tdigest,
     nid) = _HEAD.unpack_from(buf)
    if magic != _MAGIC:
        _not_v2(buf)
        _reject(f"not an {FORMAT_NAME} blob of format version {FORMAT_VERSION} (starts with "
                f"{bytes(buf[:4])!r}, expected {_MAGIC!r})")
    if version != int(FORMAT_VERSION):
        _reject(f"format version {version}, expected {FORMAT_VERSION}")
    if digest is None:
        digest = hashlib.sha256(memoryview(buf)[:-_DIGEST_SIZE]).digest()
    if digest != buf[-_DIGEST_SIZE:]:
        _reject("digest mismatch: the blob was corrupted, truncated or altered")
    if bits not in _BITS:
        _reject(f"bits {bits}, expected 4, 8 or 32")
    if rounding not in _ROUNDINGS or (rounding == _ROUND_NONE) != (bits == 32):
        _reject(f"rounding {rounding} with bits {bits}")
    if reserved:
        _reject(f"reserved header byte is {reserved}, expected 0")
    if nid > _MAX_CLIENT_ID_BYTES:
        _reject(f"client id of {nid} bytes, expected at most {_MAX_CLIENT_ID_BYTES}")
    try:
        client_id = bytes(buf[_HEAD.size:_HEAD.size + nid]).decode("utf-8")
    except UnicodeDecodeError as e:
        _reject(f"client id is not UTF-8 ({e})")
    problem = _text_problem(client_id)
    if problem:
        _reject(f"client id {problem}")
    entries, (nsteps, nvectors, ncodes), want = _layout(
        [(k, list(v.shape)) for k, v in template.items()], bits)
    if tdigest != want:
        _reject(f"template digest mismatch: the blob (bits {bits}) was made for a model with "
                "other parameter names or shapes")
    start = _HEAD.size + nid
    start += -start % 8
    if any(buf[_HEAD.size + nid:start]):
        _reject("header padding is not zero")
    size = start + nsteps + nvectors + ncodes + _DIGEST_SIZE
    if len(buf) != size:
        _reject(f"blob is {len(buf)} bytes, the model takes {size} with bits {bits} "
                "(truncated or trailing bytes)")
    vtype = torch.float32 if bits == 32 else torch.bfloat16
    steps = _frombuffer(buf, torch.float32, nsteps // 4, start)
    vectors = _frombuffer(buf, vtype, nvectors // vtype.itemsize, start + nsteps)
    code_start = start + nsteps + nvectors
    if steps.numel():
        ok = torch.isfinite(steps) & (steps > 0)
        if not bool(ok.all()):
            _reject(f"step sizes must be finite and positive, got {steps[~ok][:4].tolist()}")
    if vectors.numel() and not bool(torch.isfinite(vectors).all()):
        bad = next(name for name, shape, kind, _, v, _ in entries if kind != _KIND_CODES
                   and not bool(torch.isfinite(vectors[v:v + math.prod(shape)]).all()))
        _reject(f"parameter {bad!r}: non-finite values")
    step_max = float(steps.max()) if steps.numel() else 0.0
    values = vectors.float()  # every vector entry converted at once (a view of it each)
    decoded: Dict[str, Tensor] = {}
    for name, shape, kind, s, v, c in entries:
        numel = math.prod(shape)
        if kind != _KIND_CODES:
            decoded[name] = values[v:v + numel].reshape(shape)
            continue
        scale = steps[s:s + shape[0]]
        if not numel:
            decoded[name] = torch.zeros(shape, dtype=torch.float32)
            continue
        nbytes = (numel * bits + 7) // 8
        x = ops.unpack_dequantize(_frombuffer(buf, torch.uint8, nbytes, code_start + c), scale,
                                  bits=bits, shape=shape, axis=0)
        # |code| <= 2**(bits-1): code * scale can only overflow when this bound exceeds float32's
        # range; only then look at the values (a huge scale times a large code)
        if step_max * (1 << (bits - 1)) > _F32_MAX and not bool(torch.isfinite(x).all()):
            _reject(f"parameter {name!r}: step size too large, code * step overflows float32")
        decoded[name] = x
    out = {name: decoded[name].to(template[name].device) for name in template}
    if return_info:
        return out, {"round": round_, "client_id": client_id, "num_samples": num_samples,
                     "bits": bits, "codec": _codec_options(bits, rounding == _ROUND_STOCH)}
    return out


def _frombuffer(buf: bytearray, dtype: torch.dtype, count: int, offset: int) -> Tensor:
    """``count`` elements of ``dtype`` at byte ``offset`` of ``buf``, sharing its memory."""
    if not count:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def _not_v2(buf) -> None:
    """Names what a blob that is not a version 2 update is, when it is a safetensors blob of
    this codec: a version 1 update (refused: both sides run the same package) or a model."""
    if len(buf) < 9 or buf[8:9] != b"{":
        return
    head = bytes(buf[8:8 + min(len(buf) - 8, 4096)])
    for fmt in (FORMAT_NAME, MODEL_FORMAT_NAME):
        if f'"format":"{fmt}"'.encode() in head:
            if fmt == FORMAT_NAME:
                _reject("format version 1 (a safetensors update blob): this receiver reads "
                        f"version {FORMAT_VERSION} only; sender and receiver must run the same "
                        "oqfl_ext")
            _reject(f"format {fmt!r} (a model blob), expected an update blob")


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
    if isinstance(blob, (bytes, bytearray, memoryview)) and bytes(blob[:4]) == _MAGIC:
        _reject(f"format {FORMAT_NAME!r} (an update blob), expected {MODEL_FORMAT_NAME!r}")
    meta, tensors = _open(blob, template, MODEL_FORMAT_NAME, MODEL_FORMAT_VERSION,
                          _MODEL_META_KEYS, _MODEL_ST)
    if meta["bits"] not in ("8", "32"):
        _reject(f"bits {_quote(meta['bits'])}, expected 8 or 32")
    bits = int(meta["bits"])
    round_ = _parse_int(meta, "round")
    params = _parse_params(meta, bits)
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
