"""Checkpoints of a federated run: safetensors + JSON, written atomically after every round.

A checkpoint folder holds

* ``checkpoint-rNNNNNN.safetensors`` -- the tensors after round ``NNNNNN`` (rounds completed):
  ``model::<name>`` (every entry of the global model's ``state_dict()``, integer and boolean
  buffers included), ``momentum::<name>`` (the FedAvgM buffer, when there is one),
  ``client::<i>::<name>`` (the state of the i-th client of the server's list, e.g. its
  error-feedback residual ``residual.<param>``, its held broadcast model ``held.*``),
  ``downlink::<name>`` (with a delta downlink: the server's broadcast model, its version,
  what each client holds and the deltas kept for catching up, see
  :meth:`oqfl_ext.fl.downlink.DeltaBroadcast.state_dict`) and ``rng::torch`` (the global torch
  CPU generator state, uint8);
* ``checkpoint.json`` -- ``{"format": "oqfl-checkpoint", "version": 1, "round": N,
  "tensors": "checkpoint-r...safetensors", "sha256": <hex of that file>, "config": {...},
  "server": {...}, "clients": [ids], "rounds": [metrics per round], "python_random": ...}``.

Writing order: the tensors file (temporary file, fsync, rename), then ``checkpoint.json`` the
same way, then older tensors files are deleted. The rename of ``checkpoint.json`` is the commit:
a run killed at any moment leaves either the previous checkpoint or the new one, both complete,
and the JSON's SHA-256 ties it to its tensors. A write that fails (a full disk) raises
:class:`CheckpointWriteError` (an ``OSError``) naming the last good checkpoint, which is left
in place. Nothing is pickled; loading parses JSON and safetensors only.

Why resuming gives the uninterrupted run's model bit for bit: every random choice of a round is
a function of ``(seed, round, client)`` (client sampling: ``derive_seed(seed, round, ...)`` in
:meth:`Server.sample_clients`; batch order, model randomness and stochastic rounding:
``derive_seed(client.seed, round)`` in :meth:`Client.train`, under a forked global generator),
and every state that outlives a round -- the global model (with quantizer flags and batch-norm
counters), the FedAvgM buffer, the clients' error-feedback residuals, the round counter -- is
saved exactly (safetensors keeps dtypes and bytes). The global torch and Python ``random``
states are saved and restored too, for code outside the library that draws from them. Same
machine, same thread count, same library versions: the resumed rounds execute the same
floating-point operations on the same values. (A ``client_time_limit_s`` that actually drops
clients depends on the machine's speed and breaks this, as it would break two uninterrupted
runs.)

Resuming checks that the run is the same: ``config`` (the caller's options, e.g. the command
line's) and a fingerprint of the server (seed, fraction, learning rate, momentum, norm bound,
downlink, client ids, their seeds, sizes and :class:`ClientConfig`, the model's state names,
shapes and dtypes) must match key by key, except the keys in ``ignore`` (default:
:data:`RESUME_IGNORE`: the number of rounds, output and display options); settings added later
(:data:`ADDED_SETTINGS`) at their old value count as absent, so older checkpoints resume;
:class:`CheckpointMismatch` names the first differing option. A damaged checkpoint raises
:class:`CheckpointError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .metrics import check_rounds, jsonable, atomic_write_bytes
from .._checks import check_int

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointWriteError", "Checkpoint",
           "CHECKPOINT_JSON", "RESUME_IGNORE", "save_checkpoint", "load_checkpoint", "restore", "resume",
           "has_checkpoint", "server_fingerprint", "compare_configs"]

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "oqfl-checkpoint"
VERSION = 1
RESUME_IGNORE = frozenset({"rounds", "out", "resume", "quiet", "progress", "data_dir",
                           "device_note", "threads", "eval_integer"})
# settings added after checkpoints were first written, at the value that gives the behaviour a
# checkpoint without them had: such a key at that value is left out of both sides of a
# comparison (at any depth), so an older checkpoint resumes and a changed setting is caught
ADDED_SETTINGS = {"uplink_compression": "none", "quant_init": "mse", "grad_scale": "lsq",
                  "act_grad_count": "all", "step_size_lr_scale": 1.0}
_TENSORS_RE = re.compile(r"^checkpoint-r(\d{6,})\.safetensors$")
_SEP = "::"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, damaged or does not fit the server."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint was written by a run with another configuration."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the message names the last good
    checkpoint, which is still in place. ``errno`` is the failed write's."""

    def __init__(self, message: str, errno: Optional[int] = None):
        super().__init__(message)
        self.errno = errno


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: ``round`` (rounds completed), the saved ``config`` and ``server``
    fingerprint, the metrics ``rounds`` so far, the server ``state`` (as
    :meth:`Server.state_dict`, clients keyed by id), ``torch_rng`` (uint8 tensor or None),
    ``python_random`` (the ``random.getstate()`` as JSON lists, or None) and the ``path`` of
    its JSON file."""

    round: int
    config: dict
    server: dict
    rounds: List[dict]
    state: dict
    torch_rng: Optional[Tensor]
    python_random: Optional[list]
    path: Path


# ----------------------------------------------------------------------------------------------
# fingerprints and configuration checks

def server_fingerprint(server) -> dict:
    """What identifies a run of ``server`` (JSON-able): see the module docstring."""
    clients = []
    for c in server.clients:
        entry: Dict[str, Any] = {"id": c.client_id}
        for attr in ("seed", "num_samples"):
            v = getattr(c, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                entry[attr] = v
        cfg = getattr(c, "config", None)
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            entry["config"] = jsonable(dataclasses.asdict(cfg))
        clients.append(entry)
    model = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
             for k, v in server.model.state_dict().items()}
    return {"seed": server.seed, "fraction": server.fraction, "server_lr": server.server_lr,
            "server_momentum": server.server_momentum, "norm_bound": server.norm_bound,
            "downlink": getattr(server, "downlink_name", "float32"),
            "uplink_compression": getattr(server, "uplink_compression", "none"),
            "clients": clients, "model": model}


def _without_added_defaults(value):
    """``value`` without the :data:`ADDED_SETTINGS` keys that hold their old behaviour."""
    if isinstance(value, dict):
        return {k: _without_added_defaults(v) for k, v in value.items()
                if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    if isinstance(value, list):
        return [_without_added_defaults(v) for v in value]
    return value


def _first_difference(a, b, path: str):
    """``(dotted key, detail)`` of the first difference between two JSON values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            key = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return key, f"(set only in {'the checkpoint' if k in a else 'this run'})"
            d = _first_difference(a[k], b[k], key)
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return path, f"(length {len(a)} in the checkpoint, {len(b)} in this run)"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    if a != b:
        return path, f"(checkpoint: {a!r}, this run: {b!r})"
    return None


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                    ignore: Iterable[str] = RESUME_IGNORE, what: str = "option") -> None:
    """Raises :class:`CheckpointMismatch` naming the first key (outside the top-level keys in
    ``ignore``) whose value differs between ``saved`` and ``current``. Keys of
    :data:`ADDED_SETTINGS` at their old value count as absent on both sides."""
    ignore = set(ignore)
    a = {k: v for k, v in _without_added_defaults(jsonable(dict(saved))).items()
         if k not in ignore}
    b = {k: v for k, v in _without_added_defaults(jsonable(dict(current))).items()
         if k not in ignore}
    diff = _first_difference(a, b, "")
    if diff is not None:
        key, detail = diff
        raise CheckpointMismatch(f"cannot resume: {what} {key!r} differs {detail} from the run "
                                 f"that wrote the checkpoint; use the same options, or another "
                                 f"output folder for a new run")


# ----------------------------------------------------------------------------------------------
# saving

def _cpu(t: Tensor) -> Tensor:
    # the tensors of Server.state_dict() are copies already
    return t.detach().to("cpu").contiguous()


def save_checkpoint(folder, server, *, config: Optional[Mapping[str, Any]] = None,
                    rounds: Sequence[Mapping[str, Any]] = (), keep: int = 1) -> Path:
    """Writes the checkpoint of ``server`` after ``server.round`` rounds into ``folder``
    (created if missing; see the module docstring) and returns the JSON file's path.

    ``config``: the caller's options (compared on resume); ``rounds``: the metrics records
    so far (returned again by :func:`resume`); ``keep``: how many tensors files to keep (the
    newest; >= 1). A failed write raises :class:`CheckpointWriteError`; the previous
    checkpoint is left as it was."""
    try:
        return _write_checkpoint(folder, server, config=config, rounds=rounds, keep=keep)
    except OSError as e:
        raise CheckpointWriteError(_write_failure(Path(folder), int(server.round), e),
                                   e.errno) from e


def _write_failure(folder: Path, rnd: int, error: OSError) -> str:
    """The message of a failed checkpoint write: what failed, and the last good checkpoint."""
    what = error.strerror or str(error)
    path = folder / CHECKPOINT_JSON
    try:
        last = json.loads(path.read_bytes().decode("utf-8")).get("round")
    except FileNotFoundError:
        last = None
    except (OSError, ValueError, AttributeError):  # unreadable: say so rather than guess
        last = "?"
    if last is None:
        kept = f"no earlier checkpoint in {folder}"
    else:
        kept = f"the last good checkpoint is {path} (after round {last})"
    return f"could not write the checkpoint after round {rnd} into {folder} ({what}); {kept}"


def _write_checkpoint(folder, server, *, config, rounds, keep) -> Path:
    from .._io import encode_safetensors

    check_int("keep", keep, minimum=1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = server.state_dict()
    tensors: Dict[str, Tensor] = {}
    for k, v in state["model"].items():
        tensors[f"model{_SEP}{k}"] = _cpu(v)
    if state.get("momentum") is not None:
        for k, v in state["momentum"].items():
            tensors[f"momentum{_SEP}{k}"] = _cpu(v)
    ids = [c.client_id for c in server.clients]
    client_states = state.get("clients") or {}
    for i, cid in enumerate(ids):
        for k, v in client_states.get(cid, {}).items():
            tensors[f"client{_SEP}{i}{_SEP}{k}"] = _cpu(v)
    for k, v in (state.get("downlink") or {}).items():
        tensors[f"downlink{_SEP}{k}"] = _cpu(v)
    tensors[f"rng{_SEP}torch"] = torch.get_rng_state().clone()
    rnd = int(state["round"])
    name = f"checkpoint-r{rnd:06d}.safetensors"
    data = encode_safetensors(tensors, {"format": FORMAT, "version": str(VERSION),
                                        "round": str(rnd)})
    atomic_write_bytes(folder / name, data)
    py_state = random.getstate()
    doc = {"format": FORMAT, "version": VERSION, "round": rnd, "tensors": name,
           "sha256": hashlib.sha256(data).hexdigest(),
           "config": jsonable(dict(config or {})), "server": jsonable(server_fingerprint(server)),
           "clients": ids, "momentum": state.get("momentum") is not None,
           "python_random": [py_state[0], list(py_state[1]), py_state[2]],
           "rounds": jsonable([dict(r) for r in rounds])}
    path = folder / CHECKPOINT_JSON
    atomic_write_bytes(path, json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n")
    # older tensors files (and temporary files of a killed write) are no longer needed
    files = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := _TENSORS_RE.match(p.name)) and p.name != name)
    stale = [p for r, p in files if r != rnd]
    for p in stale[:max(0, len(stale) - (keep - 1))]:
        p.unlink(missing_ok=True)
    for p in folder.glob(".checkpoint*.tmp"):
        p.unlink(missing_ok=True)
    return path


def has_checkpoint(folder) -> bool:
    """Whether ``folder`` holds a checkpoint JSON file."""
    return (Path(folder) / CHECKPOINT_JSON).is_file()


# ----------------------------------------------------------------------------------------------
# loading

def load_checkpoint(folder) -> Checkpoint:
    """Reads and verifies the checkpoint in ``folder`` (no server needed). Raises
    :class:`CheckpointError` (FileNotFoundError's message for a missing one) saying what is
    wrong."""
    from safetensors.torch import load as st_load

    folder = Path(folder)
    path = folder / CHECKPOINT_JSON
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} ({CHECKPOINT_JSON} not found)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint, not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} file")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {doc.get('version')!r}, this "
                              f"oqfl_ext reads version {VERSION}")
    for key, typ in (("round", int), ("tensors", str), ("sha256", str), ("config", dict),
                     ("server", dict), ("clients", list), ("rounds", list), ("momentum", bool)):
        if not isinstance(doc.get(key), typ) or (typ is int and isinstance(doc[key], bool)):
            raise CheckpointError(f"{path}: damaged checkpoint, field {key!r} missing or not "
                                  f"a {typ.__name__}")
    rnd = doc["round"]
    if rnd < 0 or len(doc["rounds"]) != rnd:
        raise CheckpointError(f"{path}: damaged checkpoint, round {rnd} with "
                              f"{len(doc['rounds'])} metrics records")
    try:
        records = check_rounds(doc["rounds"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint, {e}") from None
    for i, r in enumerate(records):  # Server.fit numbers its records 0, 1, ...
        if r["round"] != i:
            raise CheckpointError(f"{path}: damaged checkpoint, rounds[{i}]['round'] is "
                                  f"{r['round']}, expected {i}")
    name = doc["tensors"]
    if not _TENSORS_RE.match(name) or int(_TENSORS_RE.match(name).group(1)) != rnd:
        raise CheckpointError(f"{path}: damaged checkpoint, tensors file name {name!r} does not "
                              f"match round {rnd}")
    tpath = folder / name
    try:
        data = tpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{tpath}: missing (named by {path})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc["sha256"]:
        raise CheckpointError(f"{tpath}: damaged checkpoint, SHA-256 {digest[:16]}... differs "
                              f"from the {doc['sha256'][:16]}... recorded in {path}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{tpath}: damaged checkpoint, not a safetensors file ({e})") \
            from None
    ids = doc["clients"]
    model: Dict[str, Tensor] = {}
    momentum: Dict[str, Tensor] = {}
    downlink: Dict[str, Tensor] = {}
    clients: Dict[str, Dict[str, Tensor]] = {cid: {} for cid in ids}
    torch_rng = None
    for key, t in tensors.items():
        kind, _, rest = key.partition(_SEP)
        if kind == "model" and rest:
            model[rest] = t
        elif kind == "momentum" and rest:
            momentum[rest] = t
        elif kind == "downlink" and rest:
            downlink[rest] = t
        elif kind == "client" and _SEP in rest:
            idx, _, name_ = rest.partition(_SEP)
            if not idx.isdigit() or int(idx) >= len(ids) or not name_:
                raise CheckpointError(f"{tpath}: damaged checkpoint, tensor {key!r} names no "
                                      f"client")
            clients[ids[int(idx)]][name_] = t
        elif key == f"rng{_SEP}torch":
            torch_rng = t
        else:
            raise CheckpointError(f"{tpath}: damaged checkpoint, unexpected tensor {key!r}")
    if doc["momentum"] != bool(momentum):
        raise CheckpointError(f"{tpath}: damaged checkpoint, momentum tensors "
                              f"{'missing' if doc['momentum'] else 'unexpected'}")
    state = {"model": model, "momentum": momentum if doc["momentum"] else None, "round": rnd,
             "clients": clients, "downlink": downlink}
    return Checkpoint(round=rnd, config=doc["config"], server=doc["server"],
                      rounds=records, state=state, torch_rng=torch_rng,
                      python_random=doc.get("python_random"), path=path)


def restore(server, ckpt: Checkpoint, *, config: Optional[Mapping[str, Any]] = None,
            ignore: Iterable[str] = RESUME_IGNORE, restore_rng: bool = True) -> List[dict]:
    """Checks that ``ckpt`` was written by the same run (``config`` and the server's
    fingerprint, see the module docstring), loads it into ``server`` (global model, momentum,
    round, client states) and, with ``restore_rng``, the global torch and Python ``random``
    states; returns the metrics records of the rounds run so far."""
    if config is not None:
        compare_configs(ckpt.config, config, ignore=ignore)
    compare_configs(ckpt.server, server_fingerprint(server), ignore=(), what="server setting")
    if set(ckpt.state["model"]) != set(server.model.state_dict()):
        raise CheckpointError(f"{ckpt.path}: damaged checkpoint, its model tensors do not "
                              f"match its own description")
    try:
        server.load_state_dict(ckpt.state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt.path}: does not fit this server ({e})") from None
    if restore_rng:
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        pr = ckpt.python_random
        if pr is not None:
            try:
                random.setstate((pr[0], tuple(pr[1]), pr[2]))
            except (TypeError, ValueError, IndexError) as e:
                raise CheckpointError(f"{ckpt.path}: damaged Python random state ({e})") \
                    from None
    return [dict(r) for r in ckpt.rounds]


def resume(folder, server, *, config: Optional[Mapping[str, Any]] = None,
           ignore: Iterable[str] = RESUME_IGNORE, restore_rng: bool = True) -> List[dict]:
    """:func:`load_checkpoint` ``(folder)`` and :func:`restore` it into ``server``; returns the
    metrics records so far (``server.round`` of them). The caller continues with
    ``server.run_round(server.round)`` (or :meth:`Server.fit`)."""
    return restore(server, load_checkpoint(folder), config=config, ignore=ignore,
                   restore_rng=restore_rng)
