"""The compressed downlink: the change of the broadcast model, int4/int8, with error feedback.

``downlink="int4-delta"`` (or ``"int8-delta"``) of :class:`oqfl_ext.fl.Server`. The server keeps
the *broadcast model* ``B``: the model every client that is up to date holds, bit for bit. It is
distinct from the global model ``G`` the server aggregates into. Each round (version ``v``):

1. ``d = G - B`` on the floating-point entries (float32, CPU) is encoded as a version 2 update
   blob (:func:`oqfl_ext.fl.codec.encode_update`, ``bits`` 4 or 8, round half to even: int4/int8
   codes with per-channel steps for weights, bfloat16 for 0-D/1-D entries);
2. ``B <- B + decode(blob)``: the server applies its own blob with :func:`apply_delta`, the
   function every client applies it with (float32 additions on the CPU), so both get the same
   bits. Server-side error feedback is implicit: what the blob failed to carry, ``G - B``, is
   part of the next round's ``d``, never lost;
3. the clients train from ``B``; their updates (``local - B``) are averaged into ``G``.

A client is sent what it needs to reach version ``v`` from the version the server last knows
it held (a reply with an update, or a :class:`~oqfl_ext.fl.Dropped`, shows that it had the
round's model): the chain of the deltas since then, or a float32 snapshot of ``B`` (exact),
whichever is smaller (a chain of one delta, the round's own, is sent without building the
snapshot: int4/int8 codes are a fraction of float32 values). A client the server knows nothing
of (first round, or one that failed: its state is unknown) gets the snapshot, or, when both
sides hold the same *initial template* ``T``, the smaller of the snapshot and a *sparse
snapshot* followed by a chain. The first round, and any round where an entry that is not
floating point differs between ``G`` and ``B`` (they never change in a run), *rebases*: ``B``
becomes an exact copy of ``G`` and everyone starts from a snapshot (or a sparse one). The
server keeps the deltas that a client may still need, up to :func:`raw_limit` bytes of them.

First contact: the initial template ``T`` is the model as the run's ``model_fn`` builds it
under the run's seed (:func:`oqfl_ext.fl.server.initial_model`), which every client can build
too (:func:`oqfl_ext.fl.experiment.initial_template`). The broadcast model of the last rebase
(version ``r``; ``r = 0`` in a run) differs from it only where the server changed it before
the round (the quantizers' calibrated step sizes and offsets, their ``initialized`` flags), so
the *sparse snapshot* carries only the entries of ``B_r`` whose dtype, shape or bytes differ
from ``T``, exactly, and the chain of deltas ``r+1 .. v`` follows it (kind 2). The client
(:class:`HeldModel` built with its template) checks ``T``'s state digest (a blob made for
another template is refused), rebuilds ``B_r`` from ``T`` and the sent entries, checks its
state digest and applies the chain. A client that failed after a sparse snapshot (a template
that differs, or any other failure) gets full snapshots from then on; a server or client
without a template (``initial_template=None``, e.g. a model whose construction was not
deterministic) sends or needs full snapshots.

Wire format: a *downlink blob* is one Zstandard frame (level 1, content size in its header,
checked against :func:`raw_limit` before anything is decompressed) of

==========  ====================================================================
4 bytes     magic ``b"OQFD"``
u8          format version, 2 (version 1 had no kind 2; it is refused)
u8          bits of the deltas: 4 or 8
u8          kind: 0 snapshot, 1 chain of deltas, 2 sparse snapshot + chain of deltas
u8          reserved, 0
u64         round of the broadcast
u64         version ``v`` the client holds after applying it
32 bytes    model digest of the template: SHA-256 over every state entry's name, dtype
            and shape (a blob for another model is refused)
u32         number of items
items       each ``u64 length`` + item
32 bytes    SHA-256 of everything before it
==========  ====================================================================

A snapshot item is ``u64 version, 32-byte state digest`` + an :func:`oqfl_ext.fl.codec.
encode_model` float32 blob of ``B``; a delta item is ``u64 base version, u64 version, 32-byte
base state digest, 32-byte state digest`` + an (uncompressed) update blob. A kind 2 blob's
first item is a *sparse snapshot*: ``u64 version, 32-byte state digest of the template,
32-byte state digest, u32 n`` (the number of state entries), a bitmap of ``ceil(n / 8)`` bytes
over the entries in sorted-name order (bit ``i % 8`` of byte ``i // 8`` set: entry ``i`` is
sent), and a float32 :func:`oqfl_ext.fl.codec.encode_model` blob of the entries set (nothing
when no bit is set); delta items follow. The *state digest*
(:func:`state_digest`) is SHA-256 over every entry's name, dtype, shape and bytes: the client
checks its model against the base digest before applying a delta and against the result
digest after, so a client holds the server's model bit for bit or refuses the blob
(:class:`~oqfl_ext.fl.codec.UpdateRejected`). Items of a chain the client already applied (a
client whose reply got lost) are skipped.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_int
from .._io import tensor_bytes, tensor_digest
from . import codec as _codec
from .codec import UpdateRejected

__all__ = ["DELTA_DOWNLINKS", "DeltaBroadcast", "HeldModel", "apply_delta", "state_digest",
           "model_digest", "raw_limit", "parse_blob"]

DELTA_DOWNLINKS = {"int4-delta": 4, "int8-delta": 8}
_MAGIC = b"OQFD"
_VERSION = 2
_SNAPSHOT, _CHAIN, _SPARSE = 0, 1, 2
_KINDS = {_SNAPSHOT: "snapshot", _CHAIN: "chain", _SPARSE: "sparse"}
# magic, version, bits, kind, reserved, round, version held after, model digest, items
_HEAD = struct.Struct("<4sBBBBQQ32sI")
_SNAP_HEAD = struct.Struct("<Q32s")
_DELTA_HEAD = struct.Struct("<QQ32s32s")
# version, template's state digest, state digest, number of state entries (+ bitmap, blob)
_SPARSE_HEAD = struct.Struct("<Q32s32sI")
_LEN = struct.Struct("<Q")


def _dtype(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _digest(domain: bytes, state: Mapping[str, Tensor], with_data: bool) -> bytes:
    digest = tensor_digest(domain, {}, {
        k: (_dtype(t), list(t.shape), tensor_bytes(t) if with_data else b"")
        for k, t in state.items()})
    return bytes.fromhex(digest.split(":", 1)[1])


def model_digest(state: Mapping[str, Tensor]) -> bytes:
    """SHA-256 over the names, dtypes and shapes of ``state`` (in sorted-name order: a state
    read back from safetensors has its names sorted)."""
    return _digest(b"oqfl-downlink-model", state, with_data=False)


def state_digest(state: Mapping[str, Tensor]) -> bytes:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state`` (in sorted-name order):
    equal digests mean bit-identical models."""
    return _digest(b"oqfl-downlink-state", state, with_data=True)


def raw_limit(template: Mapping[str, Tensor]) -> int:
    """The most bytes a downlink blob for ``template`` decompresses to: four times its float32
    size plus 1 MiB (a snapshot is about 1x; the server sends no chain larger than this)."""
    return 4 * sum(4 * t.numel() for t in template.values()) + (1 << 20)


def _floats(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def apply_delta(state: Mapping[str, Tensor], update_blob: bytes) -> Dict[str, Tensor]:
    """``state`` plus the decoded delta ``update_blob`` (uncompressed update blob over its
    floating-point entries): ``(state[k].float() + delta[k]).to(dtype)`` on the CPU, the one
    computation the server and every client run. Other entries are kept as they are."""
    delta = _codec.decode_update(update_blob, _floats(state), compression="none")
    out = {}
    for k, v in state.items():
        if k in delta:
            out[k] = (v.float() + delta[k]).to(v.dtype)
        else:
            out[k] = v
    return out


def _cpu_copy(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _same(a: Tensor, b: Tensor) -> bool:
    """Bit-identical (``torch.equal`` would call 0.0 and -0.0 equal, NaN and NaN not)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))


def _sparse_item(state: Mapping[str, Tensor], version: int, digest: bytes,
                 initial: Mapping[str, Tensor], initial_digest: bytes,
                 round_: int) -> Optional[bytes]:
    """The sparse snapshot of ``state`` against the initial template (module docstring), or
    None when the two are not the same model (names, dtypes, shapes)."""
    if model_digest(state) != model_digest(initial):
        return None
    names = sorted(state)
    bitmap = bytearray((len(names) + 7) // 8)
    changed = {}
    for i, k in enumerate(names):
        if not _same(state[k], initial[k]):
            bitmap[i // 8] |= 1 << (i % 8)
            changed[k] = state[k]
    payload = _codec.encode_model(changed, round=round_) if changed else b""
    return (_SPARSE_HEAD.pack(version, initial_digest, digest, len(names)) + bytes(bitmap)
            + payload)


def _container(bits: int, kind: int, round_: int, version: int, mdigest: bytes,
               items: List[bytes]) -> bytes:
    out = bytearray(_HEAD.pack(_MAGIC, _VERSION, bits, kind, 0, round_, version, mdigest,
                               len(items)))
    for item in items:
        out += _LEN.pack(len(item))
        out += item
    out += hashlib.sha256(out).digest()
    return bytes(out)


def _compress(raw: bytes) -> bytes:
    return _codec.wrap_update(raw, "zstd")


def _reject(msg: str):
    raise UpdateRejected(f"downlink rejected: {msg}")


def parse_blob(blob, template: Mapping[str, Tensor]) -> dict:
    """The checked framing of a downlink blob for ``template``: ``{"bits", "kind"
    ("snapshot" | "chain" | "sparse"), "round", "version", "items": [bytes]}``. Raises
    UpdateRejected (corruption, truncation, another model, a decompression bomb)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob expected bytes, got {type(blob).__name__}")
    limit = raw_limit(template)
    try:
        raw = _codec.unwrap_update(blob, "zstd", limit)
    except UpdateRejected as e:
        _reject(str(e))
    if len(raw) < _HEAD.size + 32:
        _reject(f"{len(raw)} bytes, shorter than the smallest downlink blob")
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        _reject("SHA-256 mismatch (corrupted or truncated)")
    magic, version, bits, kind, reserved, round_, target, mdigest, n = _HEAD.unpack_from(raw)
    if magic != _MAGIC:
        _reject(f"not a downlink blob (magic {magic!r})")
    if version != _VERSION:
        _reject(f"format version {version}, this oqfl_ext reads version {_VERSION}")
    if bits not in (4, 8) or kind not in _KINDS or reserved:
        _reject(f"bad header (bits {bits}, kind {kind}, reserved {reserved})")
    if mdigest != model_digest(template):
        _reject("made for another model (names, dtypes or shapes differ from this client's)")
    if kind == _SNAPSHOT and n != 1:
        _reject(f"a snapshot with {n} items")
    if kind == _SPARSE and n < 1:
        _reject("a sparse snapshot blob without items")
    items, pos, end = [], _HEAD.size, len(raw) - 32
    for _ in range(n):
        if pos + _LEN.size > end:
            _reject("truncated item list")
        (size,), pos = _LEN.unpack_from(raw, pos), pos + _LEN.size
        if size > end - pos:
            _reject("truncated item")
        items.append(raw[pos:pos + size])
        pos += size
    if pos != end:
        _reject(f"{end - pos} bytes after the last item")
    return {"bits": bits, "kind": _KINDS[kind], "round": round_, "version": target,
            "items": items}


class HeldModel:
    """What a client holds of the compressed downlink: the broadcast model ``state`` (CPU),
    its ``version`` (None before the first snapshot) and ``digest``. :meth:`receive` applies a
    downlink blob; :meth:`state_dict` / :meth:`load_state_dict` keep it between rounds (a
    checkpoint, a Flower node's ``context.state``).

    Args:
        initial_template: the run's initial template (module docstring, "First contact";
            :func:`oqfl_ext.fl.experiment.initial_template`), which a sparse snapshot is
            applied to; None: this client takes full snapshots only. It is not part of
            :meth:`state_dict` (the client builds it again).
    """

    def __init__(self, initial_template: Optional[Mapping[str, Tensor]] = None):
        self.initial = None if initial_template is None else _cpu_copy(initial_template)
        self.initial_digest = None if self.initial is None else state_digest(self.initial)
        self._reset()

    def _reset(self) -> None:
        self.version: Optional[int] = None
        self.state: Optional[Dict[str, Tensor]] = None
        self.digest: Optional[bytes] = None

    def _from_sparse(self, item: bytes, template: Mapping[str, Tensor]
                     ) -> Tuple[int, Dict[str, Tensor], bytes]:
        """``(version, state, digest)`` of the model a sparse snapshot item describes."""
        if self.initial is None:
            _reject("a sparse snapshot, and this client has no initial template: it needs "
                    "a full snapshot")
        if len(item) < _SPARSE_HEAD.size:
            _reject("truncated sparse snapshot item")
        version, tdigest, digest, n = _SPARSE_HEAD.unpack_from(item)
        if tdigest != self.initial_digest:
            _reject("sparse snapshot made for another initial template (this client's "
                    "differs: another seed, model or build): it needs a full snapshot")
        names = sorted(self.initial)
        if n != len(names) or set(names) != set(template):
            _reject(f"sparse snapshot over {n} entries, this client's model has "
                    f"{len(template)}")
        bitmap = item[_SPARSE_HEAD.size:_SPARSE_HEAD.size + (n + 7) // 8]
        if len(bitmap) != (n + 7) // 8:
            _reject("truncated sparse snapshot bitmap")
        sent = [k for i, k in enumerate(names) if bitmap[i // 8] >> (i % 8) & 1]
        if n % 8 and bitmap[-1] >> (n % 8):
            _reject("sparse snapshot bitmap has bits past the last entry")
        payload = item[_SPARSE_HEAD.size + len(bitmap):]
        if sent:
            changed = _cpu_copy(_codec.decode_model(payload, {k: template[k] for k in sent}))
        elif payload:
            _reject(f"{len(payload)} bytes after an empty sparse snapshot")
        else:
            changed = {}
        state = {k: changed[k] if k in changed else self.initial[k] for k in template}
        if state_digest(state) != digest:
            _reject("the model rebuilt from the sparse snapshot differs from the server's")
        return version, state, digest

    def receive(self, blob, template: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Applies the downlink blob (checked against ``template``: names, dtypes, shapes of
        the model's full ``state_dict()``) and returns the model now held (a new dict of its
        tensors, to load or copy, not to modify in place). On any problem it raises
        UpdateRejected and keeps what it held."""
        info = parse_blob(blob, template)
        if info["kind"] == "snapshot":
            version, digest = _SNAP_HEAD.unpack_from(info["items"][0])
            if version != info["version"]:
                _reject(f"snapshot of version {version} in a blob for version "
                        f"{info['version']}")
            state = _cpu_copy(_codec.decode_model(info["items"][0][_SNAP_HEAD.size:],
                                                  dict(template)))
            if state_digest(state) != digest:
                _reject("the snapshot's state digest does not match its values")
            self.version, self.state, self.digest = version, state, digest
            return dict(state)
        version, state, digest = self.version, self.state, self.digest
        items = info["items"]
        if info["kind"] == "sparse":  # start over from the template, then the chain
            version, state, digest = self._from_sparse(items[0], template)
            items = items[1:]
        for item in items:
            if len(item) < _DELTA_HEAD.size:
                _reject("truncated delta item")
            base, new, base_digest, new_digest = _DELTA_HEAD.unpack_from(item)
            if new != base + 1:
                _reject(f"a delta from version {base} to {new}")
            if version is not None and new <= version:
                if new == version and new_digest != digest:
                    _reject(f"version {new} differs from the one this client holds")
                continue  # applied already (its reply got lost)
            if version is None:
                _reject("this client holds no model yet: it needs a snapshot")
            if base != version or base_digest != digest:
                _reject(f"a delta from version {base}, this client holds version {version}"
                        + ("" if base != version else " with other values"))
            state = apply_delta(state, item[_DELTA_HEAD.size:])
            if state_digest(state) != new_digest:
                _reject(f"version {new} after the delta differs from the server's")
            version, digest = new, new_digest
        if version != info["version"]:
            _reject(f"the blob leaves this client at version {version}, it names version "
                    f"{info['version']}")
        self.version, self.digest = version, digest
        self.state = {k: state[k] for k in template}  # the model's order (a checkpoint sorts)
        return dict(self.state)

    def state_dict(self) -> Dict[str, Tensor]:
        """``{"version": int64, "model.<name>": ...}``, or ``{}`` when it holds nothing."""
        if self.state is None:
            return {}
        out = {"version": torch.tensor(self.version, dtype=torch.int64)}
        out.update({f"model.{k}": v.clone() for k, v in self.state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restores :meth:`state_dict` (``{}``: holds nothing; the initial template stays)."""
        if not state:
            self._reset()
            return
        bad = [k for k in state if k != "version" and not k.startswith("model.")]
        if bad or "version" not in state:
            raise ValueError(f"held model state expected 'version' and 'model.*' entries, got "
                             f"{sorted(state)[:5]}")
        self.version = check_int("held model version", state["version"].item(), minimum=0)
        self.state = _cpu_copy({k[len("model."):]: v for k, v in state.items()
                                if k.startswith("model.")})
        self.digest = state_digest(self.state)


class DeltaBroadcast:
    """The server side of the compressed downlink (module docstring): the broadcast model,
    its version, the deltas a client may still need and the version each client holds.

    Args:
        bits: 4 or 8.
        client_ids: every client of the run.
        initial_template: the initial template the clients hold (module docstring, "First
            contact"); None: first contact is a full snapshot.
    """

    def __init__(self, bits: int, client_ids,
                 initial_template: Optional[Mapping[str, Tensor]] = None):
        if bits not in (4, 8):
            raise ValueError(f"bits expected 4 or 8, got {bits!r}")
        self.bits = bits
        self.client_ids = list(client_ids)
        self.initial = None if initial_template is None else _cpu_copy(initial_template)
        self.initial_digest = None if self.initial is None else state_digest(self.initial)
        self.state: Optional[Dict[str, Tensor]] = None   # B, CPU
        self.version = -1
        self.round = 0
        self.digest: Optional[bytes] = None
        self.history: Dict[int, bytes] = {}   # version -> delta item reaching it
        self.held: Dict[str, Optional[int]] = {c: None for c in self.client_ids}
        self.base: Optional[bytes] = None     # sparse snapshot item of the last rebase
        self.base_version = 0
        self.no_template: set = set()         # clients that failed after a sparse snapshot
        self._sparse_sent: set = set()        # clients sent a sparse snapshot this round
        self._cache: Dict[object, Tuple[bytes, str]] = {}

    # ------------------------------------------------------------ a round
    def prepare(self, global_state: Mapping[str, Tensor], round_idx: int) -> None:
        """Moves ``B`` one version towards ``global_state`` (``G``): a delta, or a rebase to
        an exact copy of ``G`` (first round, other structure, changed non-float entries)."""
        g = {k: v.detach() for k, v in global_state.items()}
        self._cache = {}
        self._sparse_sent = set()
        self.round = round_idx
        rebase = self.state is None or set(self.state) != set(g) or any(
            self.state[k].dtype != v.dtype or self.state[k].shape != v.shape
            or (not v.is_floating_point() and not torch.equal(self.state[k], v.cpu()))
            for k, v in g.items())
        self.version += 1
        if rebase:
            self.state = _cpu_copy(g)
            self.digest = state_digest(self.state)
            self.history = {}
            self.held = {c: None for c in self.client_ids}
            self.base_version = self.version
            self.base = None if self.initial is None else _sparse_item(
                self.state, self.version, self.digest, self.initial, self.initial_digest,
                round_idx)
        else:
            delta = {k: v.float().cpu() - self.state[k].float()
                     for k, v in g.items() if v.is_floating_point()}
            blob = _codec.encode_update(delta, bits=self.bits, round=round_idx,
                                        stochastic=False, compression="none")
            new = apply_delta(self.state, blob)
            digest = state_digest(new)
            self.history[self.version] = _DELTA_HEAD.pack(self.version - 1, self.version,
                                                          self.digest, digest) + blob
            self.state = {k: new[k] for k in g}  # the model's order (a checkpoint sorts)
            self.digest = digest
            self._prune()

    def blob_for(self, client_id: str) -> Tuple[bytes, str]:
        """``(blob, "chain" | "sparse" | "snapshot")`` bringing ``client_id`` to the current
        version ("sparse": a sparse snapshot and the chain since it)."""
        held = self.held.get(client_id)
        if held is not None and held > self.version:
            held = None  # cannot be: the server's record is wrong, start over
        sparse = held is None and self.base is not None and client_id not in self.no_template
        key = "sparse" if sparse else held
        if key not in self._cache:
            self._cache[key] = self._blob(held, sparse)
        out = self._cache[key]
        if out[1] == "sparse":
            self._sparse_sent.add(client_id)
        return out

    def _blob(self, held: Optional[int], sparse: bool) -> Tuple[bytes, str]:
        start = self.base_version if sparse else held
        if start is None or not all(v in self.history
                                    for v in range(start + 1, self.version + 1)):
            return self._snapshot()
        items = [self.history[v] for v in range(start + 1, self.version + 1)]
        if sparse:
            items.insert(0, self.base)
        blob = _compress(_container(self.bits, _SPARSE if sparse else _CHAIN, self.round,
                                    self.version, model_digest(self.state), items))
        # a one-delta chain (the client took part in the last round) skips the comparison
        if (len(items) <= 1 and not sparse) or len(blob) < len(self._snapshot()[0]):
            return blob, "sparse" if sparse else "chain"
        return self._snapshot()

    def _snapshot(self) -> Tuple[bytes, str]:
        if "snapshot" not in self._cache:
            item = _SNAP_HEAD.pack(self.version, self.digest) + _codec.encode_model(
                self.state, round=self.round)
            self._cache["snapshot"] = (_compress(_container(
                self.bits, _SNAPSHOT, self.round, self.version, model_digest(self.state),
                [item])), "snapshot")
        return self._cache["snapshot"]

    def settle(self, client_id: str, outcome: str) -> None:
        """Records what a round's reply says of ``client_id``: ``"received"`` (it holds the
        current version), ``"unknown"`` (it failed: the next blob is a snapshot) or
        ``"unchanged"`` (not delivered, or unconfirmed: a chain from what it held before;
        the client skips the deltas it applied already)."""
        if outcome == "received":
            self.held[client_id] = self.version
        elif outcome == "unknown":
            self.held[client_id] = None
            if client_id in self._sparse_sent:  # perhaps another template: no more sparse
                self.no_template.add(client_id)
        self._prune()

    def _prune(self) -> None:
        """Keeps the deltas some client may still need, at most :func:`raw_limit` bytes: those
        after the oldest version a client is known to hold, and after the last rebase while a
        client the server knows nothing of can take a sparse snapshot."""
        known = [v for v in self.held.values() if v is not None]
        if self.base is not None and any(v is None and c not in self.no_template
                                         for c, v in self.held.items()):
            known.append(self.base_version)
        oldest = min(known) if known else self.version
        budget = raw_limit(self.state) if self.state is not None else 0
        kept, total = {}, 0
        for v in sorted(self.history, reverse=True):
            total += len(self.history[v])
            if v <= oldest or total > budget:
                break
            kept[v] = self.history[v]
        self.history = dict(sorted(kept.items()))

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Tensor]:
        """Flat tensors (for :mod:`oqfl_ext.fl.checkpoint`): ``version``, ``round``, ``held``
        (int64 per client, -1: unknown), ``no_template`` (int64 per client, 1: full
        snapshots only), ``model.<name>`` (B), ``delta.<version>`` (uint8 delta items) and,
        with an initial template, ``base_version`` and ``base`` (the uint8 sparse snapshot
        item of the last rebase)."""
        if self.state is None:
            return {}
        out = {"version": torch.tensor(self.version, dtype=torch.int64),
               "round": torch.tensor(self.round, dtype=torch.int64),
               "held": torch.tensor([-1 if self.held[c] is None else self.held[c]
                                     for c in self.client_ids], dtype=torch.int64),
               "no_template": torch.tensor([int(c in self.no_template)
                                            for c in self.client_ids], dtype=torch.int64)}
        if self.base is not None:
            out["base_version"] = torch.tensor(self.base_version, dtype=torch.int64)
            out["base"] = torch.frombuffer(bytearray(self.base), dtype=torch.uint8)
        out.update({f"model.{k}": v.clone() for k, v in self.state.items()})
        out.update({f"delta.{v}": torch.frombuffer(bytearray(item), dtype=torch.uint8)
                    for v, item in self.history.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restores :meth:`state_dict` (a state without ``no_template`` / ``base``, from before
        sparse snapshots: none until the next rebase)."""
        if not state:
            self.__init__(self.bits, self.client_ids, self.initial)
            return
        for key in ("version", "round", "held"):
            if key not in state:
                raise ValueError(f"downlink state expected a {key!r} entry")
        held = state["held"].tolist()
        if len(held) != len(self.client_ids):
            raise ValueError(f"downlink state has {len(held)} clients, this server "
                             f"{len(self.client_ids)}")
        self.version = check_int("downlink version", int(state["version"]), minimum=0)
        self.round = check_int("downlink round", int(state["round"]), minimum=0)
        self.held = {c: None if h < 0 else h for c, h in zip(self.client_ids, held)}
        flags = state["no_template"].tolist() if "no_template" in state else [0] * len(held)
        if len(flags) != len(self.client_ids):
            raise ValueError(f"downlink state has no_template for {len(flags)} clients, this "
                             f"server has {len(self.client_ids)}")
        self.no_template = {c for c, f in zip(self.client_ids, flags) if f}
        self.base = None
        if "base" in state and self.initial is not None:
            if "base_version" not in state:
                raise ValueError("downlink state expected a 'base_version' entry with 'base'")
            base = bytes(tensor_bytes(state["base"].contiguous()))
            self.base_version = check_int("downlink base_version",
                                          int(state["base_version"]), minimum=0)
            # made for this template (another one: full snapshots until the next rebase)
            if len(base) >= _SPARSE_HEAD.size and \
                    _SPARSE_HEAD.unpack_from(base)[1] == self.initial_digest:
                self.base = base
        self.state = _cpu_copy({k[len("model."):]: v for k, v in state.items()
                                if k.startswith("model.")})
        self.history = {int(k[len("delta."):]): bytes(tensor_bytes(v.contiguous()))
                        for k, v in state.items() if k.startswith("delta.")}
        self.digest = state_digest(self.state)
        self._cache, self._sparse_sent = {}, set()
