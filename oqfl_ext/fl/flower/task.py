"""What both sides of a Flower run read from the run config, and the in-process run of the same
experiment (no Flower needed here).

A Flower run is described by its run config (``[tool.flwr.app.config]`` of the app's
``pyproject.toml``, overridden with ``flwr run ... --run-config "key=value ..."``). Its keys are
the experiment's options, named as ``oqfl-fl``'s command-line options without ``--``
(``clients``, ``rounds``, ``train-subset``, ``weight-bits``, ...; ``"none"`` where an option
takes no value; :meth:`oqfl_ext.fl.experiment.ExperimentConfig.from_options`, with the same
defaults and checks as the command line), plus the Flower settings of :class:`FlowerSettings`
(``round-timeout``, ``wait-nodes-timeout``, ``threads``, ``out-dir``). The ServerApp and every
ClientApp parse it with :func:`parse_run_config` and build the same data, partitions, model and
clients from it with :mod:`oqfl_ext.fl.experiment`: client ``i`` (``client-<i>``) is the
SuperNode whose node config says ``partition-id=i`` (and ``num-partitions`` = ``clients``).
The data are read from the local files on every machine (``$OQFL_DATA``, or for
Fashion-MNIST ``$OQFL_FASHION_MNIST`` or the Debian package's folder).

:func:`run_in_process` runs the same experiment with in-process clients: the reference a
Flower run is compared with (same seed and partitions: the same global model up to float
rounding, the same blob lengths).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .. import experiment as ex
from ..._checks import check_int
from ..experiment import ExperimentConfig

__all__ = ["FlowerSettings", "parse_run_config", "run_config_defaults", "apply_threads",
           "run_in_process", "default_out_dir"]


@dataclasses.dataclass(frozen=True)
class FlowerSettings:
    """The run config's keys besides the experiment's (``round_timeout`` is
    ``round-timeout``).

    ``round_timeout``: seconds the ServerApp waits for the replies of a round (a node that has
    not answered by then is a dropped client of that round); ``wait_nodes_timeout``: seconds
    it waits for the SuperNodes at the start; ``threads`` > 0 sets ``torch.set_num_threads``
    in every Flower process of the run (0: torch's default); ``out_dir``: where the ServerApp
    writes ``metrics.json``, ``accuracy.png`` and ``model.safetensors`` (a path on the
    SuperLink's machine; empty: ``$FLWR_HOME/oqfl-runs/<run id>``).
    """

    round_timeout: float = 120.0
    wait_nodes_timeout: float = 120.0
    threads: int = ex.DEFAULT_THREADS
    out_dir: str = ""

    def __post_init__(self):
        for key in ("round_timeout", "wait_nodes_timeout"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not (v > 0 and math.isfinite(v)):
                raise ValueError(f"run config {_kebab(key)}: expected a positive number of "
                                 f"seconds, got {v!r}")
            object.__setattr__(self, key, float(v))
        check_int("run config threads:", self.threads, minimum=0)
        if not isinstance(self.out_dir, str):
            raise ValueError(f"run config out-dir: expected a path, got {self.out_dir!r}")

    def record(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_SETTINGS = {_kebab(f.name): f.name for f in dataclasses.fields(FlowerSettings)}


def parse_run_config(run_config: Mapping[str, Any]) -> Tuple[ExperimentConfig, FlowerSettings]:
    """The experiment and the Flower settings of a run config; unknown keys and bad values
    raise ValueError naming the key (a typo must not silently run the defaults). The
    experiment's ``device`` must exist on this machine."""
    options = {k: v for k, v in run_config.items() if k not in _SETTINGS}
    settings = FlowerSettings(**{_SETTINGS[k]: v for k, v in run_config.items()
                                 if k in _SETTINGS})
    cfg = ExperimentConfig.from_options(options, what="run config")
    try:
        ex.check_device(cfg.device)
    except ValueError as e:
        raise ValueError(f"run config device: {e}") from None
    return cfg, settings


def run_config_defaults() -> Dict[str, Any]:
    """Every key of the run config with its default (what the app's ``pyproject.toml``
    lists)."""
    out = ExperimentConfig().options()
    out.update({_kebab(k): v for k, v in FlowerSettings().record().items()})
    return out


def apply_threads(settings: FlowerSettings) -> None:
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)


def run_in_process(cfg: ExperimentConfig, rounds: Optional[int] = None):
    """Runs the experiment with in-process clients; returns ``(server, [RoundResult])``."""
    server = ex.build(cfg).server
    n = cfg.rounds if rounds is None else rounds
    return server, [server.run_round(r) for r in range(n)]


def default_out_dir(run_id: int) -> Path:
    import os

    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    return home / "oqfl-runs" / str(run_id)
