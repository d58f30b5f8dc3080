"""Small file helpers shared by the package: atomic writes (checkpoints, metrics, packed models)
and the SHA-256 digest of a tensor file (update/model blobs, packed models)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

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


STATE_FORMAT = "oqfl-state"
STATE_VERSION = "1"


def encode_state(state: Mapping[str, Tensor]) -> bytes:
    """A state dict as one plain safetensors blob (CPU, contiguous copies), metadata
    ``{"format": "oqfl-state", "version": "1"}``: the saved final model of a run."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save(tensors, metadata={"format": STATE_FORMAT, "version": STATE_VERSION})
