"""The federated server: client sampling, update checking, clipping, FedAvg(M), evaluation.

Round ``t`` is :meth:`Server.begin_round` (steps 1-2) and :meth:`Server.end_round` (steps 2-6),
with the transport in between: :meth:`Server.run_round` with in-process clients, the Flower
ServerApp (:mod:`oqfl_ext.fl.flower.server_app`) with Flower messages:

1. sample ``max(1, round(fraction * K))`` of the ``K`` clients without replacement (a generator
   seeded from ``seed`` and ``t``), taken in the order of the ``clients`` list;
2. the global state goes down to the sampled clients through the downlink codec (``downlink``:
   ``"float32"``, exact, or ``"int8"``; see :func:`downlink_codec`), encoded once per round and
   counted once per client that received it in ``downlink_bytes``; or, with ``"int4-delta"`` /
   ``"int8-delta"`` (:mod:`oqfl_ext.fl.downlink`), the broadcast model moves one version
   towards the global model and each sampled client gets its own blob
   (:meth:`Server.downlink_for`: the deltas since the version it holds, or a snapshot), applies
   it to the model it holds and trains from that, and ``downlink_bytes`` sums the blobs; each
   sampled client trains from the decoded state and replies with a blob. A reply that is an exception drops the
   client (reason logged): :class:`NotDelivered` when the state never left the server (not
   counted, listed in ``not_delivered``), :class:`DeliveryUnconfirmed` when it was sent but
   nothing came back to show it arrived (counted in ``downlink_unconfirmed_bytes``, listed in
   ``unconfirmed``; a sampled client without any reply counts as this); any other failure,
   and a reply that is not bytes, means the client had the state (counted in
   ``downlink_bytes``). In process (:meth:`Server.run_round`), each client's ``train`` gets a
   copy of the decoded state, and with ``client_time_limit_s`` also ``deadline=`` (a
   :func:`time.monotonic` time; such a client's ``train`` must accept it), so an in-process
   :class:`~oqfl_ext.fl.Client` stops between mini-batches once past it (it raises
   :class:`~oqfl_ext.fl.ClientTimeout`); a client whose result arrives after its limit anyway
   is dropped too and the late blob is discarded (not counted in ``uplink_bytes``). The
   clients run one after the other, each with its own full budget. Time limits make a run
   depend on the machine's speed: a run where no client hits its limit is deterministic;
3. each blob is decoded with :func:`oqfl_ext.fl.codec.decode_update` against the global model's
   floating-point entries; a rejected blob (:class:`UpdateRejected`, or metadata naming another
   round or client) is dropped with its reason and never touches the global model;
4. with ``norm_bound``, an update whose global L2 norm (over all its entries) exceeds it is
   scaled down to that norm;
   An update's ``num_samples`` (its FedAvg weight) is the client's word: where the server
   knows how many samples it assigned the client (the client object's ``num_samples``, an
   int), a larger claim is capped at that number (listed in ``capped``, warning logged), so
   that one client cannot outweigh the others by claiming 10**18 samples;
5. FedAvg: the average of the accepted updates weighted by their ``num_samples``; with
   ``server_momentum`` ``b > 0`` (FedAvgM) ``m <- b * m + avg`` and the step is ``m``;
   ``global <- global + server_lr * step`` on the floating-point entries. Entries that are not
   floating point (``num_batches_tracked``, quantizer flags) are kept as the server has them.
   Batch-norm running variances are then clamped to ``>= 0``: a server step (``server_lr > 1``,
   momentum) can overshoot a small variance below 0, and evaluation takes its square root.
   A step that would leave any entry of the global model (or the FedAvgM buffer) non-finite is
   not applied at all (``aggregate_rejected`` says why): huge but finite updates (3e38) would
   otherwise overflow the model to inf, which no later round, downlink or checkpoint can use;
6. the global model is evaluated (eval mode) on the test set: accuracy and mean cross-entropy.

Quantized models: ``model_fn`` may build a model with :class:`oqfl_ext.nn.LSQQuantizer` s. The
server builds the global model once and, if some quantizer is not initialized, initializes them
all with :func:`oqfl_ext.nn.calibrate` on ``calibration_data`` (default: the first
``calibration_size`` examples of the first client's data), in training mode. The quantizers'
``initialized``/``signed`` flags and step sizes are then part of the global state that every
client loads, so all clients start from the same quantizers and none re-initializes from its
own data.

Uplink bytes count every blob the server received in the round, rejected ones included (they
were transmitted).

Everything random is a function of ``seed``, the round and the client (client sampling here,
batch order and stochastic rounding in :class:`~oqfl_ext.fl.Client` via ``derive_seed``), so
:meth:`Server.state_dict` (global model, FedAvgM buffer, round, the clients' error-feedback
residuals) is the whole state a run needs to continue bit-identically; :meth:`Server.fit` and
:mod:`oqfl_ext.fl.checkpoint` save it after every round and resume from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nn import LSQQuantizer, QuantConv2d, QuantLinear, calibrate, convert
from ..nn.integer import ConversionWarning
from .client import _tensors, derive_seed, float_state
from . import codec as _codec
from .codec import DEFAULT_COMPRESSION, UpdateRejected, check_compression, decode_update
from .downlink import DELTA_DOWNLINKS, DeltaBroadcast, HeldModel
from .._checks import check_int

__all__ = ["Server", "evaluate_model", "initial_model", "RoundResult", "RoundStart",
           "RemoteClient", "Dropped", "DOWNLINK_CODECS", "downlink_codec", "NotDelivered",
           "DeliveryUnconfirmed", "accept_update", "AcceptedUpdate", "step_problem"]

logger = logging.getLogger("oqfl_ext.fl")


class NotDelivered(RuntimeError):
    """Raised by a client's ``train`` when the round's global state never reached it (e.g. its
    node was not connected): the client is dropped and its downlink is not counted."""


class DeliveryUnconfirmed(RuntimeError):
    """Raised by a client's ``train`` when the global state was sent but nothing shows that it
    arrived (no reply, the node stopped answering): the client is dropped and its downlink is
    counted in ``downlink_unconfirmed_bytes``, not in ``downlink_bytes``."""


class Dropped(Exception):
    """A reply to :meth:`Server.end_round` that drops the client with this reason as it is
    (the client had the global state: its downlink is counted)."""


@dataclasses.dataclass
class RemoteClient:
    """A client the server knows by its id and the number of samples it was assigned (its
    ``num_samples`` claims are capped at that); its training happens elsewhere, e.g. on a
    Flower SuperNode (:meth:`Server.begin_round` / :meth:`Server.end_round`)."""

    client_id: str
    num_samples: int


class RoundStart(NamedTuple):
    """What :meth:`Server.begin_round` returns."""

    sampled: List[Any]
    """the sampled client objects, in the order of the ``clients`` list"""
    downlink: bytes
    """the downlink blob of the first sampled client: with ``"float32"``/``"int8"`` the
    same for every sampled client; with a delta downlink each client's own blob is
    :meth:`Server.downlink_for` ``(client_id)``"""


class _OpenRound(NamedTuple):
    round: int
    sampled: List[Any]
    blob_bytes: Dict[str, int]   # client id -> length of the downlink blob it is sent
    snapshots: List[str]         # clients sent a snapshot (delta downlinks)
    t0: float


_NO_REPLY = object()


@dataclasses.dataclass
class RoundResult:
    """What one round did.

    Attributes:
        round: the round index.
        sampled: ids of the sampled clients, in call order.
        accepted: ids of the clients whose update was aggregated.
        dropped: ``(client_id, reason)`` of every sampled client that was not aggregated.
        clipped: ids of the accepted clients whose update ``norm_bound`` scaled down.
        uplink_bytes: sum of the lengths of the blobs received (rejected ones included).
        num_samples: sum of the accepted updates' ``num_samples``.
        accuracy, loss: of the global model on the test set after the round.
        wall_time_s: seconds the round took (training, aggregation and evaluation).
        downlink_bytes: bytes of the global state delivered to clients (one encoded blob per
            sampled client that received it; see :class:`NotDelivered`).
        not_delivered: sampled clients the global state never reached (not counted).
        unconfirmed: sampled clients it was sent to without a sign that it arrived.
        downlink_unconfirmed_bytes: the bytes sent to ``unconfirmed`` clients.
        capped: accepted clients whose ``num_samples`` claim was capped at the number the
            server assigned them.
        aggregate_rejected: why the round's aggregate was not applied (it would have made
            the global model non-finite); None when it was applied or there was none.
        downlink_snapshots: with a delta downlink, the sampled clients that were sent a
            snapshot of the broadcast model rather than a chain of deltas.
        integer_accuracy: with ``evaluate_integer``, the test accuracy of the global model
            converted to integer inference (:func:`oqfl_ext.convert`); None otherwise.
    """

    round: int
    sampled: List[str]
    accepted: List[str]
    dropped: List[Tuple[str, str]]
    clipped: List[str]
    uplink_bytes: int
    num_samples: int
    accuracy: float
    loss: float
    wall_time_s: float
    downlink_bytes: int = 0
    integer_accuracy: Optional[float] = None
    not_delivered: List[str] = dataclasses.field(default_factory=list)
    unconfirmed: List[str] = dataclasses.field(default_factory=list)
    downlink_unconfirmed_bytes: int = 0
    capped: List[str] = dataclasses.field(default_factory=list)
    aggregate_rejected: Optional[str] = None
    downlink_snapshots: List[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# downlink codecs

DOWNLINK_CODECS = ("float32", "int8", *DELTA_DOWNLINKS)


class _Downlink:
    """encode(state, round) -> bytes; decode(blob, state) -> the state a client receives."""

    def __init__(self, name: str, bits: Optional[int]):
        self.name, self.bits = name, bits

    def encode(self, state: Dict[str, Tensor], round_idx: int) -> bytes:
        return _codec.encode_model(state, bits=self.bits, round=round_idx)

    def decode(self, blob: bytes, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return _codec.decode_model(blob, state)


def downlink_codec(name: str) -> _Downlink:
    """The downlink codec ``name`` (one of :data:`DOWNLINK_CODECS`): the whole global
    ``state_dict()`` as one :func:`oqfl_ext.fl.codec.encode_model` blob, ``"float32"``
    (``bits=None``: exact for float32 models) or ``"int8"`` (``bits=8``: conv/linear weights as
    int8 codes per output channel, the rest float32 or exact), decoded by
    :func:`~oqfl_ext.fl.codec.decode_model` on the client's side. The delta downlinks
    (``"int4-delta"``, ``"int8-delta"``) keep state on both sides: the server's
    :class:`oqfl_ext.fl.downlink.DeltaBroadcast`, each client's
    :class:`~oqfl_ext.fl.downlink.HeldModel`."""
    if name in DELTA_DOWNLINKS:
        raise ValueError(f"downlink {name!r} keeps state on both sides: use "
                         "oqfl_ext.fl.downlink.DeltaBroadcast / HeldModel, not downlink_codec")
    if name not in DOWNLINK_CODECS:
        raise ValueError(f"downlink expected one of {DOWNLINK_CODECS}, got {name!r}")
    return _Downlink(name, None if name == "float32" else 8)


def _held_after(reply) -> str:
    """What a round's reply says of the broadcast model the client holds
    (:meth:`oqfl_ext.fl.downlink.DeltaBroadcast.settle`)."""
    if isinstance(reply, (NotDelivered, DeliveryUnconfirmed)):
        return "unchanged"
    if isinstance(reply, (bytes, bytearray, memoryview, Dropped)):
        return "received"
    return "unknown"


def _assigned_samples(client) -> Optional[int]:
    """How many samples the server assigned ``client`` (its ``num_samples`` attribute when
    that is a non-negative int), or None when the server does not know."""
    n = getattr(client, "num_samples", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return None
    return n


class AcceptedUpdate(NamedTuple):
    """What :func:`accept_update` returns for an update it accepts."""

    update: Dict[str, Tensor]
    """the decoded update (float32, the template's names, shapes and order), clipped"""
    num_samples: int
    """its FedAvg weight: the claim, capped at ``max_samples``"""
    claimed_samples: int
    """the blob's ``num_samples`` as sent"""
    norm: Optional[float]
    """the update's global L2 norm before clipping (None without ``norm_bound``)"""
    clipped: bool
    """whether ``norm_bound`` scaled it down"""


def accept_update(blob, template: Dict[str, Tensor], *, round_idx: int, client_id: str,
                  max_samples: Optional[int] = None, norm_bound: Optional[float] = None,
                  compression: str = DEFAULT_COMPRESSION) -> AcceptedUpdate:
    """Steps 3-4 of the module docstring for one received update blob: decodes and checks it
    against ``template`` (:func:`oqfl_ext.fl.codec.decode_update`), refuses metadata naming
    another round or client, caps the ``num_samples`` claim at ``max_samples`` (when the
    receiver knows how many samples the client holds) and scales the update down to
    ``norm_bound`` (global L2 norm). The one place these checks live: :meth:`Server.end_round`
    and the Flower strategy (:mod:`oqfl_ext.fl.flower.strategy`) both call it.

    Raises :class:`~oqfl_ext.fl.codec.UpdateRejected` (the message says why) for a blob that
    is not accepted; nothing of it is returned then."""
    update, info = decode_update(blob, template, return_info=True, compression=compression)
    if info["round"] != round_idx:
        raise UpdateRejected(f"update rejected: round {info['round']}, expected {round_idx}")
    if info["client_id"] != client_id:
        raise UpdateRejected(f"update rejected: client_id {info['client_id']!r}, expected "
                             f"{client_id!r}")
    claimed = num_samples = info["num_samples"]
    if max_samples is not None and num_samples > max_samples:
        num_samples = max_samples
    norm, clipped = None, False
    if norm_bound is not None:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
        if norm > norm_bound:
            factor = norm_bound / norm
            update = {k: v * factor for k, v in update.items()}
            clipped = True
    return AcceptedUpdate(update, num_samples, claimed, norm, clipped)


def step_problem(new_values: Mapping[str, Tensor],
                 momentum: Optional[Mapping[str, Tensor]] = None) -> Optional[str]:
    """Why a server step to ``new_values`` (and the FedAvgM buffer ``momentum``) must not be
    applied, or None: it would leave an entry non-finite (step 5 of the module docstring)."""
    bad = [k for k, v in new_values.items() if not bool(torch.isfinite(v).all())]
    if momentum is not None:
        bad += [f"momentum.{k}" for k, v in momentum.items()
                if not bool(torch.isfinite(v).all())]
    if bad:
        return (f"the step would make {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} "
                f"non-finite (first: {bad[0]})")
    return None


def initial_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model_fn()`` under ``torch.manual_seed(seed)``, the global RNG stream left as it was:
    the server's initial model before calibration, and the compressed downlink's initial
    template (:func:`oqfl_ext.fl.experiment.initial_template`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn()


def _has_uninitialized_quantizers(model: nn.Module) -> bool:
    return any(isinstance(m, LSQQuantizer) and m.enabled and not m.is_initialized()
               for m in model.modules())


@torch.no_grad()
def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512,
                   device: Optional[torch.device] = None) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode on images ``x`` and labels
    ``y``, ``batch_size`` at a time on ``device`` (default: the model's); the model's
    training flag is restored after. NaN for an empty set."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    n = int(y.shape[0])
    correct, loss_sum = 0, 0.0
    try:
        for s in range(0, n, batch_size):
            logits = model(x[s:s + batch_size].to(device))
            yb = y[s:s + batch_size].to(device)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    if n == 0:
        return float("nan"), float("nan")
    return correct / n, loss_sum / n

class Server:
    """A federated server (FedAvg / FedAvgM) over in-process clients; see the module docstring.

    Args:
        model_fn: builds the (float or quantized) model; called once here under
            ``torch.manual_seed(seed)`` for the global model, and by the clients.
        test_set: a ``TensorDataset`` or ``(inputs, labels)`` for evaluation.
        clients: objects with a ``client_id``; for :meth:`run_round` also a
            ``train(global_state, model_fn, round_idx=)`` returning bytes (with
            ``client_time_limit_s``, ``train`` gets ``deadline=`` too), e.g.
            :class:`oqfl_ext.fl.Client`; :class:`RemoteClient` s for clients that train
            elsewhere (:meth:`begin_round` / :meth:`end_round`).
        fraction: share of the clients sampled per round, in (0, 1].
        server_lr: server learning rate applied to the averaged update (> 0).
        server_momentum: FedAvgM momentum in [0, 1); 0 is plain FedAvg.
        seed: seeds the initial model and the client sampling.
        norm_bound: clip each update's global L2 norm to this (> 0); None: no clipping.
        calibration_data: inputs initializing the quantizers of a quantized model (default: the
            first ``calibration_size`` examples of the first client).
        eval_batch_size: evaluation batch size.
        client_time_limit_s: seconds each sampled client may take per round (> 0); None: no
            limit. See step 2 of the module docstring.
        downlink: the downlink: ``"float32"`` or ``"int8"``, the whole global state every
            round (:func:`downlink_codec`), or ``"int4-delta"`` / ``"int8-delta"``, the
            change of the broadcast model with server-side error feedback
            (:mod:`oqfl_ext.fl.downlink`; clients train from the broadcast model).
        uplink_compression: what the clients' updates are wrapped in, one of
            :data:`oqfl_ext.fl.codec.COMPRESSIONS` (default ``"zstd"``,
            :func:`oqfl_ext.fl.codec.decode_update`); ``uplink_bytes`` counts what arrived.
        evaluate_integer: also evaluate, every round, the global model converted to integer
            inference (:func:`oqfl_ext.convert`; layers it cannot convert stay fake-quant).
        initial_template: with a delta downlink, the initial template the clients hold
            (:func:`initial_model` ``(model_fn, seed).state_dict()``, built on their side):
            first contact is then a sparse snapshot and a chain when that is smaller than a
            full snapshot (:mod:`oqfl_ext.fl.downlink`); None: a full snapshot. In-process
            clients without a ``held`` attribute are given it too.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], test_set, *, clients: Sequence,
                 fraction: float = 1.0, server_lr: float = 1.0, server_momentum: float = 0.0,
                 seed: int = 0, norm_bound: Optional[float] = None,
                 calibration_data: Optional[Tensor] = None, calibration_size: int = 256,
                 eval_batch_size: int = 512, client_time_limit_s: Optional[float] = None,
                 downlink: str = "float32", evaluate_integer: bool = False,
                 uplink_compression: str = DEFAULT_COMPRESSION,
                 initial_template: Optional[Mapping[str, Tensor]] = None):
        if not callable(model_fn):
            raise TypeError("model_fn expected a callable returning an nn.Module")
        clients = list(clients)
        if not clients:
            raise ValueError("clients expected at least one client")
        ids = [getattr(c, "client_id", None) for c in clients]
        if any(not isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("clients expected distinct str client_id attributes")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction expected a number in (0, 1], got {fraction!r}")
        if not (isinstance(server_lr, (int, float)) and server_lr > 0):
            raise ValueError(f"server_lr expected a positive number, got {server_lr!r}")
        if not (isinstance(server_momentum, (int, float)) and 0 <= server_momentum < 1):
            raise ValueError(f"server_momentum expected a number in [0, 1), got "
                             f"{server_momentum!r}")
        if norm_bound is not None and not (isinstance(norm_bound, (int, float))
                                           and norm_bound > 0 and math.isfinite(norm_bound)):
            raise ValueError(f"norm_bound expected None or a positive number, got {norm_bound!r}")
        check_int("seed", seed)
        if client_time_limit_s is not None and not (
                isinstance(client_time_limit_s, (int, float))
                and not isinstance(client_time_limit_s, bool) and client_time_limit_s > 0):
            raise ValueError(f"client_time_limit_s expected None or a positive number, got "
                             f"{client_time_limit_s!r}")
        check_compression(uplink_compression, "uplink_compression")
        self.uplink_compression = uplink_compression
        if downlink in DELTA_DOWNLINKS:
            self.downlink = None
            self.broadcast: Optional[DeltaBroadcast] = DeltaBroadcast(
                DELTA_DOWNLINKS[downlink], ids, initial_template)
        else:
            self.downlink = downlink_codec(downlink)
            self.broadcast = None
        self._holders: Dict[str, HeldModel] = {}  # for in-process clients without .held
        self._blobs: Dict[str, bytes] = {}
        self.downlink_name = downlink
        self.client_time_limit_s = (None if client_time_limit_s is None
                                    else float(client_time_limit_s))
        self.model_fn = model_fn
        self.test_x, self.test_y = _tensors(test_set)
        self.clients = clients
        self.fraction = float(fraction)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.seed = seed
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.eval_batch_size = int(eval_batch_size)
        self.evaluate_integer = bool(evaluate_integer)
        self.momentum: Optional[Dict[str, Tensor]] = None
        self.round = 0  # rounds completed (the last round index + 1)
        self._open: Optional[_OpenRound] = None  # begun by begin_round, not yet ended

        self.model = initial_model(model_fn, seed)
        if _has_uninitialized_quantizers(self.model):
            if calibration_data is None:
                first = clients[0]
                if not hasattr(first, "inputs"):
                    raise ValueError("the model has uninitialized quantizers: pass "
                                     "calibration_data (inputs) to initialize them")
                calibration_data = first.inputs[:calibration_size]
            device = self._device()
            self.model.train()
            calibrate(self.model, calibration_data.to(device))
            if _has_uninitialized_quantizers(self.model):
                raise RuntimeError("calibration left some quantizers uninitialized")

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    # ------------------------------------------------------------------ state

    def template(self) -> Dict[str, Tensor]:
        """Copies of the global model's floating-point state entries (what an update must
        carry, in this order)."""
        return {k: v.detach().clone() for k, v in float_state(self.model.state_dict()).items()}

    def state_dict(self) -> dict:
        """``{"model", "momentum", "round", "clients", "downlink"}``: copies of the global
        model's state, the FedAvgM buffer (None before the first momentum step), the number of
        rounds run, ``{client_id: client.state_dict()}`` for the clients that have a
        ``state_dict`` method (a :class:`~oqfl_ext.fl.Client`: its error-feedback residual
        and held broadcast model) and, with a delta downlink, the broadcast state
        (:meth:`oqfl_ext.fl.downlink.DeltaBroadcast.state_dict`; None otherwise). With the
        constructor's arguments this is everything later rounds depend on."""
        clients = {}
        for c in self.clients:
            if callable(getattr(c, "state_dict", None)):
                clients[c.client_id] = c.state_dict()  # copies already
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "momentum": None if self.momentum is None
                else {k: v.clone() for k, v in self.momentum.items()},
                "round": self.round, "clients": clients,
                "downlink": None if self.broadcast is None else self.broadcast.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (a state without ``"clients"`` leaves the clients
        alone)."""
        clients = state.get("clients")
        if clients is not None:
            ids = {c.client_id for c in self.clients}
            unknown = sorted(set(clients) - ids)
            if unknown:
                raise ValueError(f"state names clients this server does not have: {unknown[:5]}")
        self.model.load_state_dict(state["model"])
        mom = state.get("momentum")
        self.momentum = None if mom is None else {k: v.detach().clone() for k, v in mom.items()}
        self.round = int(state.get("round", 0))
        if self.broadcast is not None:  # a checkpoint without it: snapshots next round
            self.broadcast.load_state_dict(state.get("downlink") or {})
        if clients is not None:
            for c in self.clients:
                if callable(getattr(c, "load_state_dict", None)):
                    c.load_state_dict(clients.get(c.client_id, {}))

    # ------------------------------------------------------------------ a round

    def sample_clients(self, round_idx: int) -> List:
        k = len(self.clients)
        m = max(1, min(k, int(round(self.fraction * k))))
        if m == k:
            return list(self.clients)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, round_idx, 0x5A3))
        chosen = sorted(torch.randperm(k, generator=gen)[:m].tolist())
        return [self.clients[i] for i in chosen]

    def begin_round(self, round_idx: int) -> RoundStart:
        """Opens round ``round_idx`` (steps 1-2 of the module docstring): samples the clients
        and encodes the global state with the downlink codec. Returns ``(sampled clients,
        downlink blob)``: the caller delivers the blob to every sampled client (in process,
        or over a network) and hands their replies to :meth:`end_round`. A round begun and
        not ended is abandoned by the next ``begin_round``."""
        check_int("round_idx", round_idx, minimum=0)
        t0 = time.perf_counter()
        sampled = self.sample_clients(round_idx)
        snapshots: List[str] = []
        if self.broadcast is None:
            blob = self.downlink.encode(self._global_state(), round_idx)
            self._blobs = {c.client_id: blob for c in sampled}
        else:
            self.broadcast.prepare(self._global_state(), round_idx)
            self._blobs = {}
            for c in sampled:
                self._blobs[c.client_id], kind = self.broadcast.blob_for(c.client_id)
                if kind == "snapshot":
                    snapshots.append(c.client_id)
        self._open = _OpenRound(round_idx, sampled,
                                {k: len(v) for k, v in self._blobs.items()}, snapshots, t0)
        return RoundStart(sampled, self._blobs[sampled[0].client_id])

    def downlink_for(self, client_id: str) -> bytes:
        """The downlink blob of the open round for sampled client ``client_id``."""
        if self._open is None or client_id not in self._blobs:
            raise ValueError(f"client_id {client_id!r:.80} is not sampled in an open round")
        return self._blobs[client_id]

    def end_round(self, round_idx: int, replies: Mapping[str, Any]) -> RoundResult:
        """Closes round ``round_idx`` opened by :meth:`begin_round` (steps 2-6 of the module
        docstring) with ``replies``: ``{client_id: reply}`` of the sampled clients, where a
        reply is the update blob (bytes) or what went wrong: :class:`NotDelivered` (the blob
        never left the server), :class:`DeliveryUnconfirmed` (sent, nothing came back; also
        what a sampled client without a reply counts as), :class:`Dropped` (dropped with
        that reason; the client had the state) or any other exception (the client failed
        after it had the state). A reply from a client that was not sampled in this round
        raises ValueError and leaves the round open; so does a round that is not the open
        one (RuntimeError)."""
        opened = getattr(self, "_open", None)
        if opened is None or opened.round != round_idx:
            now = "no round is open" if opened is None else f"round {opened.round} is open"
            raise RuntimeError(f"end_round({round_idx!r}) without begin_round({round_idx!r}) "
                               f"({now})")
        if not isinstance(replies, Mapping):
            raise TypeError(f"replies expected a mapping client_id -> reply, got "
                            f"{type(replies).__name__}")
        ids = [c.client_id for c in opened.sampled]
        strangers = [cid for cid in replies if cid not in ids]
        if strangers:
            raise ValueError(f"replies from clients not sampled in round {round_idx}: "
                             f"{strangers[:5]!r:.200} (sampled: {ids[:20]})")
        self._open = None
        template = float_state(self.model.state_dict())  # unchanged until the aggregate
        accepted: List[Tuple[str, Dict[str, Tensor], int]] = []
        dropped: List[Tuple[str, str]] = []
        clipped: List[str] = []
        capped: List[str] = []
        not_delivered: List[str] = []
        unconfirmed: List[str] = []
        uplink = 0
        for client in opened.sampled:
            cid = client.client_id
            reply = replies.get(cid, _NO_REPLY)
            if reply is _NO_REPLY:
                reply = DeliveryUnconfirmed("no reply")
            if self.broadcast is not None:  # what the client holds now, as far as known
                self.broadcast.settle(cid, _held_after(reply))
            if isinstance(reply, NotDelivered):
                not_delivered.append(cid)
                self._drop(dropped, cid, f"global state not delivered: {reply}")
                continue
            if isinstance(reply, DeliveryUnconfirmed):
                unconfirmed.append(cid)
                self._drop(dropped, cid, f"no reply (delivery unconfirmed): {reply}")
                continue
            if isinstance(reply, Dropped):
                self._drop(dropped, cid, str(reply))
                continue
            if isinstance(reply, BaseException):
                self._drop(dropped, cid, f"client failed: {type(reply).__name__}: {reply}")
                continue
            if not isinstance(reply, (bytes, bytearray, memoryview)):
                self._drop(dropped, cid, f"client returned {type(reply).__name__}, not bytes")
                continue
            uplink += len(reply)
            try:
                got = accept_update(reply, template, round_idx=round_idx, client_id=cid,
                                    max_samples=_assigned_samples(client),
                                    norm_bound=self.norm_bound,
                                    compression=self.uplink_compression)
            except UpdateRejected as e:
                self._drop(dropped, cid, str(e))
                continue
            if got.num_samples < got.claimed_samples:
                logger.warning("round %d: client %s claims %d samples, it was assigned %d; "
                               "capped", round_idx, cid, got.claimed_samples, got.num_samples)
                capped.append(cid)
            if got.clipped:
                clipped.append(cid)
                logger.info("round %d: client %s update norm %.4g clipped to %.4g",
                            round_idx, cid, got.norm, self.norm_bound)
            accepted.append((cid, got.update, got.num_samples))

        total = sum(n for _, _, n in accepted)
        rejected: Optional[str] = None
        if accepted and total > 0:
            avg = self.aggregate([(u, n) for _, u, n in accepted])
            rejected = self._apply(avg)
            if rejected is not None:
                logger.warning("round %d: aggregate not applied: %s", round_idx, rejected)
        elif accepted:
            logger.warning("round %d: accepted updates carry 0 samples; global model unchanged",
                           round_idx)
        else:
            logger.warning("round %d: no update accepted; global model unchanged", round_idx)
        accuracy, loss = self.evaluate()
        integer_accuracy = self.evaluate_integer_model() if self.evaluate_integer else None
        self.round = max(self.round, round_idx + 1)
        lost = set(not_delivered) | set(unconfirmed)
        down = sum(n for cid, n in opened.blob_bytes.items() if cid not in lost)
        return RoundResult(round=round_idx, sampled=ids,
                           accepted=[cid for cid, _, _ in accepted], dropped=dropped,
                           clipped=clipped, uplink_bytes=uplink, num_samples=total,
                           accuracy=accuracy, loss=loss,
                           wall_time_s=time.perf_counter() - opened.t0,
                           downlink_bytes=down,
                           integer_accuracy=integer_accuracy, not_delivered=not_delivered,
                           unconfirmed=unconfirmed,
                           downlink_unconfirmed_bytes=sum(opened.blob_bytes[c]
                                                          for c in unconfirmed),
                           capped=capped, aggregate_rejected=rejected,
                           downlink_snapshots=[c for c in opened.snapshots if c not in lost])

    def run_round(self, round_idx: int, *,
                  on_client: Optional[Callable[[int, int, str], None]] = None) -> RoundResult:
        """Runs round ``round_idx`` with in-process clients: :meth:`begin_round`, each
        sampled client's ``train`` on a copy of the decoded downlink state (step 2 of the
        module docstring), :meth:`end_round`. ``on_client(i, m, client_id)`` is called before
        the i-th (0-based) of the m sampled clients trains and once more with ``i == m``
        before the aggregation (progress display)."""
        sampled, blob = self.begin_round(round_idx)
        template = self._global_state()
        received = None if self.downlink is None else self.downlink.decode(blob, template)
        replies: Dict[str, Any] = {}
        for i, client in enumerate(sampled):
            if on_client is not None:
                on_client(i, len(sampled), client.client_id)
            if self.broadcast is not None:  # the client applies its blob to what it holds
                try:
                    received = self._holder(client).receive(
                        self.downlink_for(client.client_id), template)
                except UpdateRejected as e:
                    replies[client.client_id] = e
                    continue
            replies[client.client_id] = self._train_in_process(client, received, round_idx)
        if on_client is not None:
            on_client(len(sampled), len(sampled), "")
        return self.end_round(round_idx, replies)

    def _train_in_process(self, client, received: Dict[str, Tensor], round_idx: int) -> Any:
        """One in-process client's reply: its blob, or the exception it raised, or
        :class:`Dropped` when it ran past ``client_time_limit_s``."""
        global_state = {k: v.detach().clone() for k, v in received.items()}
        kwargs: Dict[str, Any] = {"round_idx": round_idx}
        limit = self.client_time_limit_s
        start = time.monotonic()
        if limit is not None:
            kwargs["deadline"] = start + limit
        try:
            blob = client.train(global_state, self.model_fn, **kwargs)
        except Exception as e:  # a failing client never stops the round
            elapsed = time.monotonic() - start
            if limit is not None and not isinstance(e, (NotDelivered, DeliveryUnconfirmed)) \
                    and (isinstance(e, TimeoutError) or elapsed > limit):
                return Dropped(f"client exceeded its time limit of {limit:g} s "
                               f"({type(e).__name__}: {e}; {elapsed:.2f} s)")
            return e
        elapsed = time.monotonic() - start
        if limit is not None and elapsed > limit:
            return Dropped(f"client exceeded its time limit of {limit:g} s (took "
                           f"{elapsed:.2f} s); late update discarded")
        return blob

    def _holder(self, client) -> HeldModel:
        """The broadcast model an in-process client holds: its ``held`` attribute (a
        :class:`~oqfl_ext.fl.Client`'s), else one the server keeps for it."""
        held = getattr(client, "held", None)
        if isinstance(held, HeldModel):
            return held
        if client.client_id not in self._holders:
            self._holders[client.client_id] = HeldModel(self.broadcast.initial)
        return self._holders[client.client_id]

    def _global_state(self) -> Dict[str, Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def fit(self, rounds: int, *, checkpoint_dir=None, config: Optional[Mapping[str, Any]] = None,
            resume: bool = False, keep: int = 1,
            on_round: Optional[Callable[[dict, RoundResult], None]] = None,
            on_client: Optional[Callable[[int, int, str], None]] = None) -> List[dict]:
        """Runs rounds ``self.round .. rounds - 1`` and returns one metrics record per round
        run so far (:func:`oqfl_ext.fl.metrics.round_record` plus ``train_loss``, the
        sample-weighted mean training loss of the accepted clients).

        With ``checkpoint_dir``, a checkpoint (:mod:`oqfl_ext.fl.checkpoint`) is written there
        after every round, with ``config`` (the caller's options, JSON-able) and the records.
        ``resume``: continue from the checkpoint in ``checkpoint_dir`` (its records come
        first in the result); the configuration must match (``CheckpointMismatch`` otherwise);
        a folder that does not exist yet or is empty starts the run at round 0, any other
        folder without a checkpoint is refused (``CheckpointError``; nothing in it is touched).
        Without ``resume`` a folder that already holds a checkpoint is refused. A checkpoint
        that cannot be written raises ``CheckpointWriteError`` (an ``OSError``), leaving the
        previous one. ``on_round(record, result)`` is called after each round's checkpoint,
        ``on_client`` is passed to :meth:`run_round`.
        """
        from pathlib import Path

        from . import checkpoint as ckpt
        from .metrics import mean_train_loss, round_record

        check_int("rounds", rounds, minimum=0)
        records: List[dict] = []
        if checkpoint_dir is not None:
            if resume and ckpt.has_checkpoint(checkpoint_dir):
                records = ckpt.resume(checkpoint_dir, self, config=config)
                logger.info("resumed from %s after round %d", checkpoint_dir, self.round)
            elif resume and Path(checkpoint_dir).is_dir() and \
                    any(Path(checkpoint_dir).iterdir()):
                # e.g. an orphaned tensors file, or a mistyped folder: starting over would
                # overwrite or delete what is there
                raise ckpt.CheckpointError(
                    f"{checkpoint_dir} holds no {ckpt.CHECKPOINT_JSON} but is not empty: "
                    "nothing to resume, and a new run there could overwrite its files; "
                    "check the folder, or start the run in a new or empty one")
            elif resume:
                logger.warning("no checkpoint in %s: starting at round 0", checkpoint_dir)
            elif ckpt.has_checkpoint(checkpoint_dir):
                raise ckpt.CheckpointError(
                    f"{checkpoint_dir} already holds a checkpoint (after round "
                    f"{ckpt.load_checkpoint(checkpoint_dir).round}); resume it or choose "
                    "another folder")
        elif resume:
            raise ValueError("resume=True needs a checkpoint_dir")
        for r in range(self.round, rounds):
            result = self.run_round(r, on_client=on_client)
            by_id = {c.client_id: c for c in self.clients}
            train_loss = mean_train_loss(
                (getattr(by_id[cid], "last_loss", None), getattr(by_id[cid], "num_samples", 1))
                for cid in result.accepted)
            extra = ({} if result.integer_accuracy is None
                     else {"integer_accuracy": result.integer_accuracy})
            if self.broadcast is not None:
                extra["downlink_snapshots"] = list(result.downlink_snapshots)
            record = round_record(result, downlink_bytes=result.downlink_bytes,
                                  train_loss=train_loss, **extra)
            records.append(record)
            if checkpoint_dir is not None:
                ckpt.save_checkpoint(checkpoint_dir, self, config=config, rounds=records,
                                     keep=keep)
            if on_round is not None:
                on_round(record, result)
        return records

    @staticmethod
    def _drop(dropped: list, cid: str, reason: str) -> None:
        dropped.append((cid, reason))
        logger.warning("client %s dropped: %s", cid, reason)

    @staticmethod
    def aggregate(updates: Sequence[Tuple[Dict[str, Tensor], int]]) -> Dict[str, Tensor]:
        """The ``num_samples``-weighted average of decoded updates (float32, summed in the
        given order): ``sum_i (n_i / sum_j n_j) * u_i``."""
        total = sum(n for _, n in updates)
        if total <= 0:
            raise ValueError("aggregate expected a positive total of num_samples")
        out: Dict[str, Tensor] = {}
        for update, n in updates:
            w = n / total
            for k, v in update.items():
                out[k] = v * w if k not in out else out[k] + v * w
        return out

    @torch.no_grad()
    def _apply(self, avg: Dict[str, Tensor]) -> Optional[str]:
        """Applies the server step for ``avg``; returns None, or (leaving the model and the
        FedAvgM buffer untouched) why the step was refused: it would make an entry
        non-finite."""
        if self.server_momentum > 0:
            if self.momentum is None:
                momentum = {k: v.clone() for k, v in avg.items()}
            else:
                momentum = {k: self.server_momentum * self.momentum[k] + avg[k] for k in avg}
            step = momentum
        else:
            momentum, step = self.momentum, avg
        state = self.model.state_dict()  # tensors share storage with the model
        new_values = {k: state[k] + (self.server_lr * v).to(state[k].device, state[k].dtype)
                      for k, v in step.items()}
        problem = step_problem(new_values, momentum)
        if problem is not None:
            return problem
        self.momentum = momentum
        for k, v in new_values.items():
            state[k].copy_(v)
        # A server step (server_lr > 1, momentum) can overshoot a small batch-norm running
        # variance below 0: project back onto the feasible set, else evaluation takes the
        # square root of a negative number.
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and \
                    isinstance(getattr(m, "running_var", None), Tensor):
                m.running_var.clamp_(min=0.0)
        return None

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, float]:
        """(accuracy, mean cross-entropy) of the global model on the test set (eval mode)."""
        return self.evaluate_model(self.model)

    def evaluate_integer_model(self) -> Optional[float]:
        """Test accuracy of the global model converted to integer inference (a converted copy;
        the global model is untouched), or None when it has no quantized layer."""
        if not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in self.model.modules()):
            return None
        with warnings.catch_warnings():  # which layers stay fake-quant: said once, not per round
            warnings.simplefilter("ignore", ConversionWarning)
            integer_model = convert(self.model)
        return self.evaluate_model(integer_model)[0]

    def evaluate_model(self, model: nn.Module) -> Tuple[float, float]:
        """(accuracy, mean cross-entropy) of any ``model`` on the server's test set
        (:func:`evaluate_model` on the server's device and evaluation batch size)."""
        return evaluate_model(model, self.test_x, self.test_y, self.eval_batch_size,
                              self._device())
