"""Small file helpers shared by the package: atomic writes (checkpoints, metrics, packed models),
the one safetensors writer (update/model blobs, checkpoints, packed models, saved states) and
the SHA-256 digest of a tensor file (update/model blobs, packed models)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, then renamed over ``path`` (and the folder fsynced where the OS allows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> a normal file's mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensor_bytes(t: Tensor):
    """The bytes of a tensor (row-major) as a bytes-like object, without a copy when the tensor
    is a contiguous CPU tensor."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    # through uint8: numpy has no bfloat16
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def tensor_digest(domain: bytes, meta: Mapping[str, str],
                  tensors: Dict[str, Tuple[str, List[int], bytes]]) -> str:
    """``"sha256:" + hex`` over ``domain`` (which keeps the digests of different file kinds
    apart), the metadata (all but ``digest``, canonical JSON) and, in key order, each tensor's
    key, dtype name, shape and data (any bytes-like object)."""
    h = hashlib.sha256()
    h.update(domain + b"\x00")
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


# torch dtype -> safetensors dtype name, in safetensors' own order of its dtypes (widest first,
# and within a width the order of safetensors' dtype enumeration, highest first): the order in
# which :func:`encode_safetensors` lays out the data, as safetensors itself does.
SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def encode_safetensors(tensors: Mapping[str, Tensor],
                       metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """``tensors`` (and string ``metadata``) as one safetensors file, whose bytes depend only on
    the content (not on dict order, process or hash seed): every safetensors file the package
    writes comes from here. safetensors' own writer keeps the metadata in a hash map, so two
    runs of the same content gave files with different bytes.

    Layout (the safetensors format; ``safetensors.torch.load`` reads it): the header size as 8
    bytes little-endian; the header, compact JSON (UTF-8, no ASCII escaping) with the keys of
    every object sorted (``"__metadata__"`` among the tensor names), padded with spaces to a
    multiple of 8 bytes; then the tensors' data back to back, ordered as safetensors orders
    them (widest dtype first, see :data:`SAFETENSORS_DTYPES`, then by name), so that each
    tensor starts at a multiple of its item size (the format allows no gaps between tensors).

    Tensors may live on any device and have any strides (their row-major bytes are written).
    Raises TypeError for a non-tensor, a dtype outside :data:`SAFETENSORS_DTYPES` or
    non-string metadata, ValueError for a tensor named ``"__metadata__"`` or text that is not
    valid Unicode.
    """
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: names expected str, got {type(name).__name__}")
        if name == "__metadata__":
            raise ValueError("tensors: the name '__metadata__' is reserved by safetensors")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}] expected a Tensor, got {type(t).__name__}")
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensors[{name!r}]: dtype {t.dtype} is not one of "
                            f"{', '.join(str(d) for d in SAFETENSORS_DTYPES)}")
    header: Dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata expected a dict of str -> str")
        header["__metadata__"] = dict(metadata)
    order = sorted(tensors, key=lambda k: (_DTYPE_RANK[tensors[k].dtype], k))
    views = [tensor_bytes(tensors[k]) for k in order]
    offset = 0
    for k, view in zip(order, views):
        t = tensors[k]
        header[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + len(view)]}
        offset += len(view)
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"tensor names and metadata must be valid Unicode text ({e})") from None
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *views])


STATE_FORMAT = "oqfl-state"
STATE_VERSION = "1"


def encode_state(state: Mapping[str, Tensor]) -> bytes:
    """A state dict as one plain safetensors blob (CPU, contiguous copies), metadata
    ``{"format": "oqfl-state", "version": "1"}`` (:func:`encode_safetensors`): the saved final
    model of a run."""
    return encode_safetensors(state, {"format": STATE_FORMAT, "version": STATE_VERSION})
