"""A federated client: local SGD from the global state, uplink of the encoded model delta.

What a client sends (see also :mod:`oqfl_ext.fl.server`): the difference ``local - global`` of
every **floating-point** entry of the model's ``state_dict()`` -- weights, biases, the LSQ
quantizers' step sizes and offsets, batch-norm running means and variances -- encoded by
:func:`oqfl_ext.fl.codec.encode_update`. Entries that are not floating point (batch-norm
``num_batches_tracked``, the quantizers' ``initialized`` / ``signed`` flags) are never sent:
every client loads them from the global state at the start of a round and the server keeps its
own values, so they are always those of the global model (the quantizers' flags are fixed once
the server has initialized them, see :class:`oqfl_ext.fl.server.Server`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from .codec import (DEFAULT_COMPRESSION, check_compression, decode_update, encode_update,
                    update_layout, wrap_update)
from .downlink import HeldModel
from .._checks import check_int
from ..nn.quantizer import QUANT_DEFAULTS

__all__ = ["ClientConfig", "Client", "ClientTimeout", "float_state", "derive_seed",
           "encode_with_feedback"]

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps), for independent seeded streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK63


def encode_with_feedback(delta: Dict[str, Tensor], residual: Optional[Dict[str, Tensor]], *,
                         bits: int, round: int, client_id: str, num_samples: int,
                         stochastic: bool = True, generator: Optional[torch.Generator] = None,
                         error_feedback: bool = False, compression: str = DEFAULT_COMPRESSION
                         ) -> Tuple[bytes, Optional[Dict[str, Tensor]]]:
    """The uplink of one update with error feedback (EF-SGD style): ``delta`` plus the previous
    ``residual`` (entries it has) encoded by :func:`~oqfl_ext.fl.codec.encode_update` and
    wrapped in ``compression``; returns ``(blob, new residual)``, the new residual being what
    the blob failed to carry (``sent - decoded``, float32 on the CPU) with ``error_feedback``,
    else None. Nothing is stored: the caller keeps the residual (a :class:`Client`, or the
    Flower mod's node state, :mod:`oqfl_ext.fl.flower.mod`)."""
    if residual is not None:
        delta = {k: v + residual[k].to(v.device, v.dtype) if k in residual else v
                 for k, v in delta.items()}
    blob = encode_update(delta, bits=bits, round=round, client_id=client_id,
                         num_samples=num_samples, stochastic=stochastic, generator=generator,
                         compression="none")
    new_residual = None
    if error_feedback:
        sent = decode_update(blob, delta, compression="none")
        new_residual = {k: (delta[k].float() - sent[k]).cpu() for k in delta}
    # the layout lets the compressor give each part of the blob its own entropy-coder table
    return wrap_update(blob, compression, update_layout(delta, bits, client_id)), new_residual


class ClientTimeout(TimeoutError):
    """A client stopped its local training because it ran past its deadline."""


def float_state(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The floating-point entries of a state dict (the ones clients send), in order."""
    return {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()}


@dataclasses.dataclass
class ClientConfig:
    """Local training and uplink settings of a client.

    Attributes:
        local_epochs: passes over the local data per round (>= 1).
        batch_size: SGD mini-batch size (>= 1).
        lr, momentum, weight_decay: of the client's own ``torch.optim.SGD`` (fresh each round).
        uplink_bits: 4 or 8 (quantized delta) or 32 (float32 delta).
        stochastic: unbiased stochastic rounding of the uplink codes (else round half to even).
        error_feedback: keep the uplink quantization error ``delta - decoded(delta)`` and add it
            to the next round's delta (EF-SGD style); no effect with ``uplink_bits=32``.
        uplink_compression: one of :data:`oqfl_ext.fl.codec.COMPRESSIONS` (default
            ``"zstd"``: the update blob entropy-coded, see :mod:`oqfl_ext.fl.codec`); the
            server must expect the same.
        step_size_lr_scale: the learning rate of the LSQ quantizers' step sizes and offsets,
            as a multiple of ``lr`` (> 0); default ``QUANT_DEFAULTS["step_size_lr_scale"]``.

    The defaults are those of ``oqfl-fl`` (SGD with momentum 0.9, int4 uplink with stochastic
    rounding and error feedback).
    """

    # the one set of client defaults: oqfl_ext.fl.experiment.ExperimentConfig takes its local
    # training and uplink defaults from these
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    uplink_bits: int = 4
    stochastic: bool = True
    error_feedback: bool = True
    uplink_compression: str = DEFAULT_COMPRESSION
    step_size_lr_scale: float = QUANT_DEFAULTS["step_size_lr_scale"]

    def __post_init__(self):
        for name in ("local_epochs", "batch_size"):
            check_int(f"ClientConfig.{name}", getattr(self, name), minimum=1)
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"ClientConfig.{name} expected a number >= 0, got {v!r}")
        if isinstance(self.uplink_bits, bool) or self.uplink_bits not in (4, 8, 32):
            raise ValueError(f"ClientConfig.uplink_bits expected 4, 8 or 32, "
                             f"got {self.uplink_bits!r}")
        v = self.step_size_lr_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"ClientConfig.step_size_lr_scale expected a positive number, "
                             f"got {v!r}")
        check_compression(self.uplink_compression, "ClientConfig.uplink_compression")


Dataset = Union[TensorDataset, Tuple[Tensor, Tensor]]


def _tensors(dataset: Dataset) -> Tuple[Tensor, Tensor]:
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
    elif isinstance(dataset, (tuple, list)):
        tensors = tuple(dataset)
    else:
        raise TypeError("dataset expected a TensorDataset or an (inputs, labels) tuple, got "
                        f"{type(dataset).__name__}")
    if len(tensors) != 2 or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError("dataset expected exactly two tensors (inputs, labels)")
    x, y = tensors
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"dataset inputs and labels expected the same first dimension, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


class Client:
    """One federated client holding its local data (a classification task, cross-entropy loss).

    Args:
        client_id: printable text (at most 256 characters), written into every update.
        dataset: a ``TensorDataset(inputs, labels)`` or an ``(inputs, labels)`` tuple.
        config: a :class:`ClientConfig` (default: ``ClientConfig()``).
        seed: the client's seed; with the round index it fixes the batch order, any randomness
            of the model (dropout) and the stochastic rounding of the uplink.
        initial_template: with a delta downlink, the run's initial template the held model
            starts from (first contact can then be a sparse snapshot,
            :class:`oqfl_ext.fl.downlink.HeldModel`); None: full snapshots.
    """

    def __init__(self, client_id: str, dataset: Dataset, config: Optional[ClientConfig] = None,
                 seed: int = 0, initial_template: Optional[Dict[str, Tensor]] = None):
        if not isinstance(client_id, str) or not client_id or not client_id.isprintable() \
                or len(client_id) > 256:
            raise ValueError(f"client_id expected non-empty printable text (<= 256 characters), "
                             f"got {client_id!r}")
        check_int("seed", seed)
        self.client_id = client_id
        self.inputs, self.labels = _tensors(dataset)
        self.config = config if config is not None else ClientConfig()
        if not isinstance(self.config, ClientConfig):
            raise TypeError(f"config expected a ClientConfig, got {type(self.config).__name__}")
        self.seed = seed
        self.residual: Optional[Dict[str, Tensor]] = None  # error feedback memory
        self.held = HeldModel(initial_template)  # the broadcast model of a delta downlink
        self.last_loss: Optional[float] = None  # mean training loss of the last round

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Tensor]:
        """The client state that carries over between rounds, as flat named tensors (for
        checkpoints): ``"residual.<name>"`` for each entry of the error-feedback residual (none
        before the first error-feedback round) and ``"held.<...>"``, the broadcast model of a
        delta downlink (:meth:`oqfl_ext.fl.downlink.HeldModel.state_dict`). Everything else a
        round uses is a function of ``(seed, round)`` and the global state."""
        out = {f"held.{k}": v for k, v in self.held.state_dict().items()}
        if self.residual is not None:
            out.update({f"residual.{k}": v.detach().clone() for k, v in self.residual.items()})
        return out

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict` (an empty dict: no residual, no held model)."""
        bad = [k for k in state if not k.startswith(("residual.", "held."))]
        if bad:
            raise ValueError(f"client {self.client_id}: unexpected state entries {bad[:5]}")
        self.held.load_state_dict({k[len("held."):]: v for k, v in state.items()
                                   if k.startswith("held.")})
        self.residual = ({k[len("residual."):]: v.detach().clone().cpu() for k, v in state.items()
                          if k.startswith("residual.")} or None)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_samples(self) -> int:
        return len(self)

    def train(self, global_state: Dict[str, Tensor], model_fn: Callable[[], nn.Module], *,
              round_idx: int = 0, deadline: Optional[float] = None) -> bytes:
        """Trains a fresh ``model_fn()`` loaded with ``global_state`` for ``local_epochs``
        epochs and returns the encoded update ``local - global`` (floating-point entries only,
        see the module docstring), with ``round=round_idx``, this client's id and
        ``num_samples=len(dataset)``.

        ``deadline``: a :func:`time.monotonic` time; the client checks it before every
        mini-batch and once more before it commits its error-feedback residual, and raises
        :class:`ClientTimeout` past it, leaving its state (the residual) unchanged."""
        check_int("round_idx", round_idx, minimum=0)
        if deadline is not None and not isinstance(deadline, (int, float)):
            raise ValueError(f"deadline expected None or a time.monotonic() value, "
                             f"got {deadline!r}")
        cfg = self.config
        base_seed = derive_seed(self.seed, round_idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seed)
            model = model_fn()
            model.load_state_dict(global_state)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            self._fit(model, device, derive_seed(base_seed, 1), deadline)
        local = float_state(model.state_dict())
        reference = float_state(global_state)
        if list(local) != list(reference):
            raise RuntimeError("model_fn() built a model whose floating-point state differs "
                               "from the global state's")
        delta = {k: (local[k].detach() - reference[k].to(local[k].device, local[k].dtype))
                 for k in local}
        ef = cfg.error_feedback and cfg.uplink_bits != 32
        gen = torch.Generator().manual_seed(derive_seed(base_seed, 2))
        blob, residual = encode_with_feedback(
            delta, self.residual if ef else None, bits=cfg.uplink_bits, round=round_idx,
            client_id=self.client_id, num_samples=len(self), stochastic=cfg.stochastic,
            generator=gen, error_feedback=ef, compression=cfg.uplink_compression)
        _check_deadline(deadline, "after encoding its update")
        if ef:
            self.residual = residual
        return blob

    def _fit(self, model: nn.Module, device: torch.device, seed: int,
             deadline: Optional[float] = None) -> None:
        cfg = self.config
        model.train()
        n = len(self)
        if n == 0:
            self.last_loss = None
            return
        opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.batch_size):
                _check_deadline(deadline, f"after {count} of {n * cfg.local_epochs} samples")
                idx = order[start:start + cfg.batch_size]
                x = self.inputs[idx].to(device)
                y = self.labels[idx].to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        self.last_loss = total / max(count, 1)


def _param_groups(model: nn.Module, cfg: ClientConfig) -> list:
    """The weights at ``lr``; the quantizers' step sizes and offsets at
    ``lr * step_size_lr_scale`` (one group when the scale is 1, as before the option)."""
    from ..nn.quantizer import LSQQuantizer
    quant = {id(p) for q in model.modules() if isinstance(q, LSQQuantizer)
             for p in q.parameters()}
    params = list(model.parameters())
    if cfg.step_size_lr_scale == 1 or not quant:
        return [{"params": params}]
    return [{"params": [p for p in params if id(p) not in quant]},
            {"params": [p for p in params if id(p) in quant],
             "lr": cfg.lr * cfg.step_size_lr_scale}]


def _check_deadline(deadline: Optional[float], where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise ClientTimeout(f"past its deadline, stopped {where}")
