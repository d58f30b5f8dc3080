"""The experiment both sides of a Flower run build from the run config, and the in-process run
of the same experiment (no Flower needed here).

A Flower run is described by its run config (``[tool.flwr.app.config]`` of the app's
``pyproject.toml``, overridden with ``flwr run ... --run-config "key=value ..."``); the ServerApp
and every ClientApp parse it with :meth:`Experiment.from_run_config` and build the same data,
partitions, model and client settings from it:

* the data: the first ``train-size`` / ``test-size`` examples of the Fashion-MNIST training /
  test split (normalized; ``image-size`` 14 averages 2x2 pixels, 28 keeps them), read from the
  local files on every machine (``$OQFL_FASHION_MNIST`` or the Debian package's folder);
* the partitions: ``partition`` ``iid`` or ``dirichlet`` (``alpha``) over ``num-clients``
  clients with the run's ``seed``; a SuperNode trains partition ``partition-id`` of its node
  config, which must say ``num-partitions = num-clients``;
* client ``i`` is ``Client("c<i>", partition i, ClientConfig(...), seed=derive_seed(seed, i))``;
* the server is ``Server(model_fn, test set, seed=seed, ...)`` with the quantizers calibrated on
  the first ``calibration-size`` examples of partition 0 (what the in-process Server does by
  default with the clients in partition order).

:func:`run_in_process` runs the same experiment with in-process clients: the reference a
Flower run is compared with (same seed and partitions: the same global model up to float
rounding, the same blob lengths).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..client import Client, ClientConfig, derive_seed

__all__ = ["Experiment", "load_data", "make_partitions", "make_client", "make_server",
           "run_in_process", "client_seed", "client_id"]

_PARTITIONS = ("iid", "dirichlet")
_DATASETS = ("fashion_mnist",)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, from the run config (keys are the field names with ``-``).

    ``norm-bound`` 0 means no clipping; ``downlink`` is the Server's downlink codec
    (``float32`` or ``int8``, :func:`oqfl_ext.fl.downlink_codec`); ``weight-bits`` /
    ``act-bits`` 0 keep that side in float
    (both 0: a float model); ``threads`` > 0 sets ``torch.set_num_threads`` in every Flower
    process of the run (0: torch's default); ``out-dir`` is where the ServerApp writes
    ``metrics.json``, ``accuracy.png`` and ``model.safetensors`` (a path on the SuperLink's
    machine; empty: ``$FLWR_HOME/oqfl-runs/<run id>``).
    """

    num_clients: int = 3
    num_rounds: int = 3
    seed: int = 0
    dataset: str = "fashion_mnist"
    train_size: int = 3000
    test_size: int = 1000
    image_size: int = 14
    partition: str = "iid"
    alpha: float = 0.5
    model: str = "small_cnn"
    width: int = 8
    weight_bits: int = 4
    act_bits: int = 4
    uplink_bits: int = 4
    stochastic: bool = True
    error_feedback: bool = True
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    fraction: float = 1.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    norm_bound: float = 0.0
    downlink: str = "float32"
    calibration_size: int = 256
    round_timeout: float = 120.0
    wait_nodes_timeout: float = 120.0
    threads: int = 0
    out_dir: str = ""

    @classmethod
    def keys(cls) -> List[str]:
        return [_kebab(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "Experiment":
        """Parses a Flower run config (unknown keys are an error: a typo must not silently
        run the defaults)."""
        fields = {_kebab(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; expected some of "
                             f"{sorted(fields)}")
        kw = {}
        for key, value in run_config.items():
            f = fields[key]
            default = f.default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"run config {key} expected true/false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"run config {key} expected an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"run config {key} expected a number, got {value!r}")
                value = float(value)
            elif not isinstance(value, str):
                raise ValueError(f"run config {key} expected a string, got {value!r}")
            kw[f.name] = value
        exp = cls(**kw)
        exp.check()
        return exp

    def check(self) -> None:
        def bad(key, what, value):
            raise ValueError(f"run config {_kebab(key)} expected {what}, got {value!r}")

        for key in ("num_clients", "num_rounds", "train_size", "test_size", "width",
                    "local_epochs", "batch_size", "calibration_size"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1", getattr(self, key))
        if self.num_clients > self.train_size:
            bad("num_clients", f"at most train-size ({self.train_size})", self.num_clients)
        if not 0 <= self.seed < 2 ** 63:
            bad("seed", "an integer in [0, 2**63)", self.seed)
        if self.dataset not in _DATASETS:
            bad("dataset", f"one of {_DATASETS}", self.dataset)
        if self.image_size not in (14, 28):
            bad("image_size", "14 or 28", self.image_size)
        if self.partition not in _PARTITIONS:
            bad("partition", f"one of {_PARTITIONS}", self.partition)
        if not self.alpha > 0:
            bad("alpha", "a positive number", self.alpha)
        for key in ("weight_bits", "act_bits"):
            if getattr(self, key) != 0 and not 2 <= getattr(self, key) <= 8:
                bad(key, "0 (float) or 2..8", getattr(self, key))
        if self.uplink_bits not in (4, 8, 32):
            bad("uplink_bits", "4, 8 or 32", self.uplink_bits)
        from ..server import DOWNLINK_CODECS

        if self.downlink not in DOWNLINK_CODECS:
            bad("downlink", f"one of {DOWNLINK_CODECS}", self.downlink)
        if not 0 < self.fraction <= 1:
            bad("fraction", "a number in (0, 1]", self.fraction)
        if not (self.norm_bound >= 0 and math.isfinite(self.norm_bound)):
            bad("norm_bound", "a number >= 0 (0: no clipping)", self.norm_bound)
        for key in ("round_timeout", "wait_nodes_timeout"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                bad(key, "a positive number of seconds", getattr(self, key))
        if self.threads < 0:
            bad("threads", "an integer >= 0", self.threads)
        self.client_config()  # ClientConfig's own checks (lr, momentum, ...)

    def to_dict(self) -> Dict[str, Any]:
        """The run config (kebab-case keys), as written to metrics.json."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def client_config(self) -> ClientConfig:
        return ClientConfig(local_epochs=self.local_epochs, batch_size=self.batch_size,
                            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                            uplink_bits=self.uplink_bits, stochastic=self.stochastic,
                            error_feedback=self.error_feedback)

    def model_fn(self) -> Callable[[], nn.Module]:
        from ...models import create
        from ...nn import quantize_model

        name, width, size = self.model, self.width, self.image_size
        wb, ab = self.weight_bits or None, self.act_bits or None

        def build() -> nn.Module:
            kw = {"width": width} if name in ("small_cnn", "vgg") else {}
            m = create(name, in_channels=1, num_classes=10, image_size=size, **kw)
            if wb is None and ab is None:
                return m
            return quantize_model(m, weight_bits=wb, act_bits=ab)

        return build

    def apply_threads(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)


def client_id(partition_id: int) -> str:
    return f"c{partition_id}"


def client_seed(exp: Experiment, partition_id: int) -> int:
    return derive_seed(exp.seed, 0xC11E, partition_id)


def load_data(exp: Experiment) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """((train inputs, labels), (test inputs, labels)) as float32 [N, 1, S, S] / int64 [N]."""
    from ...data import load_fashion_mnist

    def load(split, n):
        x, y = load_fashion_mnist(split, limit=n, normalize=True)
        if exp.image_size == 14:
            x = F.avg_pool2d(x, 2)
        return x.contiguous(), y

    return load("train", exp.train_size), load("test", exp.test_size)


def make_partitions(exp: Experiment, labels: Tensor) -> List[Tensor]:
    from ...data import partition_dirichlet, partition_iid

    if exp.partition == "iid":
        return partition_iid(labels, exp.num_clients, seed=exp.seed)
    return partition_dirichlet(labels, exp.num_clients, exp.alpha, seed=exp.seed)


def make_client(exp: Experiment, partition_id: int, train: Tuple[Tensor, Tensor],
                parts: List[Tensor]) -> Client:
    if not 0 <= partition_id < exp.num_clients:
        raise ValueError(f"partition-id expected 0..{exp.num_clients - 1}, got {partition_id}")
    x, y = train
    p = parts[partition_id]
    return Client(client_id(partition_id), (x[p], y[p]), exp.client_config(),
                  seed=client_seed(exp, partition_id))


def make_server(exp: Experiment, clients, train: Tuple[Tensor, Tensor], parts: List[Tensor],
                test: Tuple[Tensor, Tensor]):
    """The :class:`oqfl_ext.fl.Server` of the experiment; ``clients`` stand for partitions
    0..N-1 in order (in-process :class:`Client` s, or the ServerApp's mailboxes)."""
    from ..server import Server

    calibration = train[0][parts[0]][:exp.calibration_size]
    return Server(exp.model_fn(), test, clients=clients, fraction=exp.fraction,
                  server_lr=exp.server_lr, server_momentum=exp.server_momentum, seed=exp.seed,
                  norm_bound=exp.norm_bound or None, calibration_data=calibration,
                  downlink=exp.downlink)


def run_in_process(exp: Experiment, rounds: Optional[int] = None):
    """Runs the experiment with in-process clients; returns ``(server, [RoundResult])``."""
    train, test = load_data(exp)
    parts = make_partitions(exp, train[1])
    clients = [make_client(exp, i, train, parts) for i in range(exp.num_clients)]
    server = make_server(exp, clients, train, parts, test)
    n = exp.num_rounds if rounds is None else rounds
    return server, [server.run_round(r) for r in range(n)]


def default_out_dir(run_id: int) -> Path:
    import os

    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    return home / "oqfl-runs" / str(run_id)
