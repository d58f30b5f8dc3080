"""The federated server: client sampling, update checking, clipping, FedAvg(M), evaluation.

Round ``t`` (:meth:`Server.run_round`):

1. sample ``max(1, round(fraction * K))`` of the ``K`` clients without replacement (a generator
   seeded from ``seed`` and ``t``), taken in the order of the ``clients`` list;
2. each sampled client trains from a copy of the global ``state_dict()`` and returns a blob; a
   client that raises, or returns something other than bytes, is dropped (reason logged);
3. each blob is decoded with :func:`oqfl_ext.fl.codec.decode_update` against the global model's
   floating-point entries; a rejected blob (:class:`UpdateRejected`, or metadata naming another
   round or client) is dropped with its reason and never touches the global model;
4. with ``norm_bound``, an update whose global L2 norm (over all its entries) exceeds it is
   scaled down to that norm;
5. FedAvg: the average of the accepted updates weighted by their ``num_samples``; with
   ``server_momentum`` ``b > 0`` (FedAvgM) ``m <- b * m + avg`` and the step is ``m``;
   ``global <- global + server_lr * step`` on the floating-point entries. Entries that are not
   floating point (``num_batches_tracked``, quantizer flags) are kept as the server has them;
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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..nn import LSQQuantizer, calibrate
from .client import _tensors, derive_seed, float_state
from .codec import UpdateRejected, decode_update

__all__ = ["Server", "RoundResult"]

logger = logging.getLogger("oqfl_ext.fl")


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


def _has_uninitialized_quantizers(model: nn.Module) -> bool:
    return any(isinstance(m, LSQQuantizer) and m.enabled and not m.is_initialized()
               for m in model.modules())


class Server:
    """A federated server (FedAvg / FedAvgM) over in-process clients; see the module docstring.

    Args:
        model_fn: builds the (float or quantized) model; called once here under
            ``torch.manual_seed(seed)`` for the global model, and by the clients.
        test_set: a ``TensorDataset`` or ``(inputs, labels)`` for evaluation.
        clients: objects with a ``client_id`` and ``train(global_state, model_fn, round_idx=)``
            returning bytes (e.g. :class:`oqfl_ext.fl.Client`).
        fraction: share of the clients sampled per round, in (0, 1].
        server_lr: server learning rate applied to the averaged update (> 0).
        server_momentum: FedAvgM momentum in [0, 1); 0 is plain FedAvg.
        seed: seeds the initial model and the client sampling.
        norm_bound: clip each update's global L2 norm to this (> 0); None: no clipping.
        calibration_data: inputs initializing the quantizers of a quantized model (default: the
            first ``calibration_size`` examples of the first client).
        eval_batch_size: evaluation batch size.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], test_set, *, clients: Sequence,
                 fraction: float = 1.0, server_lr: float = 1.0, server_momentum: float = 0.0,
                 seed: int = 0, norm_bound: Optional[float] = None,
                 calibration_data: Optional[Tensor] = None, calibration_size: int = 256,
                 eval_batch_size: int = 512):
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
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed expected an integer, got {seed!r}")
        self.model_fn = model_fn
        self.test_x, self.test_y = _tensors(test_set)
        self.clients = clients
        self.fraction = float(fraction)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.seed = seed
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.eval_batch_size = int(eval_batch_size)
        self.momentum: Optional[Dict[str, Tensor]] = None
        self.round = 0  # rounds completed (the last round index + 1)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = model_fn()
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
        """``{"model", "momentum", "round"}``: copies of the global model's state, the FedAvgM
        buffer (None before the first momentum step) and the number of rounds run."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "momentum": None if self.momentum is None
                else {k: v.clone() for k, v in self.momentum.items()},
                "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        mom = state.get("momentum")
        self.momentum = None if mom is None else {k: v.detach().clone() for k, v in mom.items()}
        self.round = int(state.get("round", 0))

    # ------------------------------------------------------------------ a round

    def sample_clients(self, round_idx: int) -> List:
        k = len(self.clients)
        m = max(1, min(k, int(round(self.fraction * k))))
        if m == k:
            return list(self.clients)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, round_idx, 0x5A3))
        chosen = sorted(torch.randperm(k, generator=gen)[:m].tolist())
        return [self.clients[i] for i in chosen]

    def run_round(self, round_idx: int) -> RoundResult:
        if isinstance(round_idx, bool) or not isinstance(round_idx, int) or round_idx < 0:
            raise ValueError(f"round_idx expected a non-negative integer, got {round_idx!r}")
        t0 = time.perf_counter()
        template = float_state(self.model.state_dict())  # unchanged until the aggregate
        sampled = self.sample_clients(round_idx)
        accepted: List[Tuple[str, Dict[str, Tensor], int]] = []
        dropped: List[Tuple[str, str]] = []
        clipped: List[str] = []
        uplink = 0
        for client in sampled:
            cid = client.client_id
            global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            try:
                blob = client.train(global_state, self.model_fn, round_idx=round_idx)
            except Exception as e:  # a failing client never stops the round
                self._drop(dropped, cid, f"client failed: {type(e).__name__}: {e}")
                continue
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                self._drop(dropped, cid, f"client returned {type(blob).__name__}, not bytes")
                continue
            uplink += len(blob)
            try:
                update, info = decode_update(blob, template, return_info=True)
            except UpdateRejected as e:
                self._drop(dropped, cid, str(e))
                continue
            if info["round"] != round_idx:
                self._drop(dropped, cid, f"update rejected: round {info['round']}, expected "
                                         f"{round_idx}")
                continue
            if info["client_id"] != cid:
                self._drop(dropped, cid, f"update rejected: client_id {info['client_id']!r}, "
                                         f"expected {cid!r}")
                continue
            if self.norm_bound is not None:
                norm = math.sqrt(sum(float(v.double().square().sum()) for v in update.values()))
                if norm > self.norm_bound:
                    factor = self.norm_bound / norm
                    update = {k: v * factor for k, v in update.items()}
                    clipped.append(cid)
                    logger.info("round %d: client %s update norm %.4g clipped to %.4g",
                                round_idx, cid, norm, self.norm_bound)
            accepted.append((cid, update, info["num_samples"]))

        total = sum(n for _, _, n in accepted)
        if accepted and total > 0:
            avg = self.aggregate([(u, n) for _, u, n in accepted])
            self._apply(avg)
        elif accepted:
            logger.warning("round %d: accepted updates carry 0 samples; global model unchanged",
                           round_idx)
        else:
            logger.warning("round %d: no update accepted; global model unchanged", round_idx)
        accuracy, loss = self.evaluate()
        self.round = max(self.round, round_idx + 1)
        return RoundResult(round=round_idx, sampled=[c.client_id for c in sampled],
                           accepted=[cid for cid, _, _ in accepted], dropped=dropped,
                           clipped=clipped, uplink_bytes=uplink, num_samples=total,
                           accuracy=accuracy, loss=loss,
                           wall_time_s=time.perf_counter() - t0)

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
    def _apply(self, avg: Dict[str, Tensor]) -> None:
        if self.server_momentum > 0:
            if self.momentum is None:
                self.momentum = {k: v.clone() for k, v in avg.items()}
            else:
                self.momentum = {k: self.server_momentum * self.momentum[k] + avg[k]
                                 for k in avg}
            step = self.momentum
        else:
            step = avg
        state = self.model.state_dict()  # tensors share storage with the model
        for k, v in step.items():
            t = state[k]
            t.add_((self.server_lr * v).to(t.device, t.dtype))

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, float]:
        """(accuracy, mean cross-entropy) of the global model on the test set (eval mode)."""
        model = self.model
        was_training = model.training
        model.eval()
        device = self._device()
        n = int(self.test_y.shape[0])
        correct, loss_sum = 0, 0.0
        try:
            for s in range(0, n, self.eval_batch_size):
                x = self.test_x[s:s + self.eval_batch_size].to(device)
                y = self.test_y[s:s + self.eval_batch_size].to(device)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        finally:
            model.train(was_training)
        if n == 0:
            return float("nan"), float("nan")
        return correct / n, loss_sum / n
