"""One federated experiment: its configuration (:class:`ExperimentConfig`, the one set of
defaults) and the functions that build its data, partitions, model, clients and server.

The ``oqfl-fl`` command line (:mod:`oqfl_ext.fl.cli`), the Flower apps
(:mod:`oqfl_ext.fl.flower`) and ``experiments/paper_grid.py`` all describe a run with an
:class:`ExperimentConfig` and build it here, so the same configuration and seed give the same
run whichever of them starts it:

* the options: every field is a command-line option (``--train-subset`` for
  ``train_subset``, ``--client-time-limit`` for ``client_time_limit_s``; ``name`` is the only
  field without one) and a key of a Flower run config (the option without ``--``);
  :func:`add_arguments` adds them to an ``argparse`` parser, :meth:`ExperimentConfig.from_args`
  and :meth:`ExperimentConfig.from_options` read them back, with the same checks;
* the record (:meth:`ExperimentConfig.record`): the JSON-able dict written to ``metrics.json``
  and compared by :mod:`oqfl_ext.fl.checkpoint` when a run resumes (options that do not apply,
  e.g. ``alpha`` of an ``iid`` split, are ``None`` there);
* the run: :func:`load_data` (the first ``train_subset`` / ``test_subset`` examples, pooled
  down to ``image_size``), :func:`make_partitions` (seeded with ``seed``), :func:`model_fn`
  (the zoo model, quantized with ``weight_bits`` / ``act_bits`` / ``first_last_bits``,
  ``quant_init``, ``grad_scale`` and ``act_grad_count``), :func:`make_clients` (client ``i`` is
  ``client-<i>`` on partition ``i`` with seed ``derive_seed(seed, 0xC1, i)``) and
  :func:`make_server` (quantizers calibrated on the first examples of partition 0); with a
  delta downlink both get :func:`initial_template` (the model built under ``seed``, for
  first-contact sparse snapshots); :func:`build` does all of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_int
from ..models import MODELS
from ..nn.quantizer import QUANT_DEFAULTS
from .client import Client, ClientConfig, derive_seed
from .codec import COMPRESSIONS
from .downlink import DELTA_DOWNLINKS, state_digest
from .server import DOWNLINK_CODECS, Server, initial_model

__all__ = ["ExperimentConfig", "ExperimentError", "ConfigError", "ExperimentData", "Built",
           "add_arguments", "load_dataset", "load_data", "make_partitions", "model_fn",
           "initial_template",
           "client_config", "client_id", "client_seed", "make_client", "make_clients",
           "make_server", "build", "post_training_baseline", "check_device", "DATASETS",
           "PARTITIONS", "UPLINKS",
           "MODEL_NAMES", "MAX_SEED", "DEFAULT_THREADS", "CALIBRATION_SIZE", "DEFAULT_IMAGE_SIZE",
           "parse_positive_int", "parse_nonneg_int", "parse_seed", "parse_fraction",
           "parse_positive_float", "parse_nonneg_float", "parse_momentum", "parse_subset",
           "parse_bits", "bits_text"]

DATASETS = ("fashion-mnist", "cifar10", "digits")
#: what the server evaluates on: the test set, or a validation set carved from the training
#: images (the last ``validation_size`` of them, which training then never sees)
EVAL_SPLITS = ("test", "validation")
PARTITIONS = ("iid", "dirichlet", "shards")
UPLINKS = {"float32": 32, "int8": 8, "int4": 4}
MODEL_NAMES = tuple(MODELS)
# the partitioners take seeds below 2**63 (torch.manual_seed would take up to 2**64 - 1)
MAX_SEED = 2 ** 63 - 1
# defaults sized for a run of a few minutes on 2 CPU cores (see the README)
DEFAULT_IMAGE_SIZE = {"fashion-mnist": 14}
# the default models are too small for intra-op parallelism to pay: on a 2-core machine with
# other work running, 2 torch threads were 10x slower than 1
DEFAULT_THREADS = 1
#: examples of partition 0 the server initializes the quantizers with
CALIBRATION_SIZE = 256


class ExperimentError(Exception):
    """The experiment cannot run as configured on this machine: its data set is missing, or
    the data cannot give the partition or the image size asked for (one line, naming the
    option)."""


class ConfigError(ValueError):
    """A value of an :class:`ExperimentConfig` that cannot work; ``option`` is its
    command-line option (``--image-size``), ``detail`` what is wrong."""

    def __init__(self, field: str, option: str, detail: str):
        super().__init__(f"ExperimentConfig.{field}: {detail}")
        self.field, self.option, self.detail = field, option, detail


# ----------------------------------------------------------------------------------------------
# value parsers: the command line's argument types (their messages name the value; argparse
# prefixes the option); ExperimentConfig checks its fields with them too

def _int_from(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


parse_positive_int = _int_from(1, "a positive integer")
parse_nonneg_int = _int_from(0, "an integer >= 0")


def parse_seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_SEED} (2**63 - 1), "
                                         f"got {text!r}")
    return v


def _float_in(lo: float, hi: float, lo_open: bool, hi_open: bool, what: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and \
            (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


parse_fraction = _float_in(0.0, 1.0, True, False, "a number in (0, 1]")
parse_positive_float = _float_in(0.0, math.inf, True, True, "a positive number")
parse_nonneg_float = _float_in(0.0, math.inf, False, True, "a number >= 0")
parse_momentum = _float_in(0.0, 1.0, False, True, "a number in [0, 1)")


def parse_subset(text: str) -> Optional[int]:
    if text.strip().lower() == "all":
        return None
    try:
        return parse_positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got "
                                         f"{text!r}") from None


def parse_bits(text: str) -> Optional[int]:
    t = text.strip().lower()
    if t in ("float", "fp32", "float32", "none", "32"):
        return None
    try:
        v = int(t)
    except ValueError:
        v = -1
    if not 2 <= v <= 8:
        raise argparse.ArgumentTypeError(f"expected bits in 2..8 or 'float', got {text!r}")
    return v


def bits_text(bits: Optional[int]) -> str:
    """``"float"`` for ``None``, else the number."""
    return "float" if bits is None else str(bits)


# ----------------------------------------------------------------------------------------------
# the options: one row per field of ExperimentConfig (but ``name``), in --help order

class _Option(NamedTuple):
    field: str
    flag: str
    group: str
    help: str
    parse: Optional[Callable[[str], Any]] = None  # None: choices, or a boolean switch
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None
    nullable: bool = False  # None is a value (float bits, all examples, no limit)


_DATA, _FED, _LOCAL, _QUANT, _RUN = ("model and data", "federation", "local training",
                                     "quantization and codecs", "run")
_OPTIONS: Tuple[_Option, ...] = (
    _Option("model", "--model", _DATA, "network", choices=MODEL_NAMES),
    _Option("width", "--width", _DATA, "channels of the first stage (small_cnn, vgg)",
            parse_positive_int),
    _Option("dataset", "--dataset", _DATA, "data set", choices=DATASETS),
    _Option("image_size", "--image-size", _DATA,
            "average-pool the images down to this side (default: 14 for fashion-mnist, 4x "
            "cheaper than its native 28; native otherwise)", parse_positive_int, nullable=True),
    _Option("train_subset", "--train-subset", _DATA, "use the first N training examples only",
            parse_subset, metavar="{N,all}", nullable=True),
    _Option("test_subset", "--test-subset", _DATA,
            "evaluate on the first N test examples only (default: all)", parse_subset,
            metavar="{N,all}", nullable=True),
    _Option("eval_split", "--eval-split", _DATA,
            "evaluate on the test set, or on the last --validation-size training images "
            "(held out of training; for choosing settings without the test set)",
            choices=EVAL_SPLITS),
    _Option("validation_size", "--validation-size", _DATA,
            "training images held out as the validation set (--eval-split validation)",
            parse_positive_int),
    _Option("clients", "--clients", _FED, "number of clients", parse_positive_int),
    _Option("fraction", "--fraction", _FED, "share of the clients sampled per round",
            parse_fraction),
    _Option("rounds", "--rounds", _FED, "federated rounds", parse_positive_int),
    _Option("partition", "--partition", _FED,
            "how the training set is split among the clients", choices=PARTITIONS),
    _Option("alpha", "--alpha", _FED, "Dirichlet concentration (--partition dirichlet)",
            parse_positive_float),
    _Option("classes_per_client", "--classes-per-client", _FED,
            "classes per client (--partition shards)", parse_positive_int),
    _Option("server_lr", "--server-lr", _FED, "server learning rate", parse_positive_float),
    _Option("server_momentum", "--server-momentum", _FED, "FedAvgM server momentum (0: FedAvg)",
            parse_momentum),
    _Option("norm_bound", "--norm-bound", _FED, "clip each update's L2 norm to this",
            parse_positive_float, nullable=True),
    _Option("client_time_limit_s", "--client-time-limit", _FED,
            "drop a client that takes longer than this in a round", parse_positive_float,
            metavar="SECONDS", nullable=True),
    _Option("local_epochs", "--local-epochs", _LOCAL, "epochs per round", parse_positive_int),
    _Option("batch_size", "--batch-size", _LOCAL, "mini-batch size", parse_positive_int),
    _Option("lr", "--lr", _LOCAL, "client learning rate", parse_positive_float),
    _Option("momentum", "--momentum", _LOCAL, "client SGD momentum", parse_momentum),
    _Option("weight_decay", "--weight-decay", _LOCAL, "client weight decay",
            parse_nonneg_float),
    _Option("weight_bits", "--weight-bits", _QUANT, "bits of the weights (LSQ), or float",
            parse_bits, metavar="{2..8,float}", nullable=True),
    _Option("act_bits", "--act-bits", _QUANT, "bits of the layer inputs (LSQ), or float",
            parse_bits, metavar="{2..8,float}", nullable=True),
    _Option("first_last_bits", "--first-last-bits", _QUANT,
            "bits of the first and last layers of a quantized model, or float", parse_bits,
            metavar="{2..8,float}", nullable=True),
    _Option("quant_init", "--quant-init", _QUANT,
            "how the server sets every step size before round 1 from a batch of the first "
            "client: the range with the least squared error (mse) or LSQ's 2 mean|x| / "
            "sqrt(qmax) (lsq)", choices=("mse", "lsq")),
    _Option("grad_scale", "--grad-scale", _QUANT,
            "gradient scale of the step sizes and offsets: LSQ's 1/sqrt(N_s x qmax), or "
            "none (1)", choices=("lsq", "none")),
    _Option("act_grad_count", "--act-grad-count", _QUANT,
            "N_s of the input quantizers' LSQ gradient scale: the elements of one example "
            "(LSQ's paper) or of the whole batch (all)", choices=("example", "all")),
    _Option("step_size_lr_scale", "--step-size-lr-scale", _QUANT,
            "the clients' learning rate of step sizes and offsets, as a multiple of --lr",
            parse_positive_float),
    _Option("uplink", "--uplink", _QUANT, "codec of the client updates", choices=tuple(UPLINKS)),
    _Option("uplink_compression", "--uplink-compression", _QUANT,
            "entropy-code each update blob, losslessly (zstd: Zstandard level 1, the "
            "default; zlib: DEFLATE level 6, as small and 10-20x slower)", choices=COMPRESSIONS),
    _Option("stochastic", "--stochastic", _QUANT,
            "unbiased stochastic rounding of the uplink codes (otherwise round half to even)"),
    _Option("error_feedback", "--error-feedback", _QUANT,
            "clients keep their uplink quantization error for the next round"),
    _Option("downlink", "--downlink", _QUANT, "codec of the global model sent to the clients",
            choices=DOWNLINK_CODECS),
    _Option("eval_integer", "--eval-integer", _QUANT,
            "also evaluate the quantized global model converted to integer inference "
            "(oqfl_ext.convert) every round"),
    _Option("seed", "--seed", _RUN,
            "seeds the model, the partition, the sampling and the clients", parse_seed),
    _Option("device", "--device", _RUN, "torch device: cpu, cuda or cuda:N", str),
)
_BY_FIELD = {o.field: o for o in _OPTIONS}
_BY_KEY = {o.flag[2:]: o for o in _OPTIONS}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One federated experiment; the defaults are those of ``oqfl-fl`` (a short OQFL W4A4 run
    on Fashion-MNIST). Every field is checked on construction (:class:`ConfigError`).

    ``None`` means: ``name``: derived from the bits (``oqfl-w4a4``, ``fp32``);
    ``image_size``: :data:`DEFAULT_IMAGE_SIZE` of the data set, else native; the subsets: all
    examples; ``norm_bound`` / ``client_time_limit_s``: no limit; bits: float. ``alpha`` is
    used by the ``dirichlet`` partition only, ``classes_per_client`` by ``shards``, ``width``
    by the models that take one, ``first_last_bits`` by a quantized model, ``stochastic`` and
    ``error_feedback`` by a quantized uplink, ``eval_integer`` by a quantized model.
    """

    name: Optional[str] = None
    model: str = "small_cnn"
    width: int = 16
    dataset: str = "fashion-mnist"
    image_size: Optional[int] = None
    train_subset: Optional[int] = 20000
    test_subset: Optional[int] = None
    eval_split: str = "test"
    validation_size: int = 10000
    clients: int = 10
    fraction: float = 0.5
    rounds: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    server_lr: float = 1.0
    server_momentum: float = 0.0
    norm_bound: Optional[float] = None
    client_time_limit_s: Optional[float] = None
    # local training and uplink defaults: ClientConfig's (one set of defaults)
    local_epochs: int = ClientConfig.local_epochs
    batch_size: int = ClientConfig.batch_size
    lr: float = ClientConfig.lr
    momentum: float = ClientConfig.momentum
    weight_decay: float = ClientConfig.weight_decay
    weight_bits: Optional[int] = 4
    act_bits: Optional[int] = 4
    # the quantizers' defaults live in oqfl_ext.nn.QUANT_DEFAULTS (None: float edge layers)
    first_last_bits: Optional[int] = None if QUANT_DEFAULTS["first_last_bits"] == "float" \
        else QUANT_DEFAULTS["first_last_bits"]
    quant_init: str = QUANT_DEFAULTS["init"]
    grad_scale: str = "lsq"
    act_grad_count: str = QUANT_DEFAULTS["act_grad_count"]
    step_size_lr_scale: float = ClientConfig.step_size_lr_scale
    uplink: str = {bits: name for name, bits in UPLINKS.items()}[ClientConfig.uplink_bits]
    uplink_compression: str = ClientConfig.uplink_compression
    stochastic: bool = ClientConfig.stochastic
    error_feedback: bool = ClientConfig.error_feedback
    downlink: str = "float32"
    seed: int = 0
    device: str = "cpu"
    eval_integer: bool = True

    def __post_init__(self):
        if self.name is not None and not (isinstance(self.name, str) and self.name
                                          and self.name.isprintable() and "/" not in self.name):
            raise ConfigError("name", "name", f"expected None or a printable folder name, got "
                                              f"{self.name!r:.80}")
        for opt in _OPTIONS:
            object.__setattr__(self, opt.field, _checked(opt, getattr(self, opt.field)))
        minimum = MODELS[self.model].min_image_size
        if self.image_size is not None and self.image_size < minimum:
            raise ConfigError("image_size", "--image-size", f"{self.model} needs {minimum} or "
                                                            f"more, got {self.image_size}")

    # ------------------------------------------------------------------ derived values

    @property
    def quantized(self) -> bool:
        """Whether the model has quantizers (some bits are not float)."""
        return self.weight_bits is not None or self.act_bits is not None

    @property
    def run_name(self) -> str:
        """``name``, or ``oqfl-w<bits>a<bits>`` (``f`` for float) / ``fp32``."""
        if self.name is not None:
            return self.name
        if not self.quantized:
            return "fp32"
        return f"oqfl-w{bits_text(self.weight_bits)}a{bits_text(self.act_bits)}".replace(
            "float", "f")

    @property
    def resolved_image_size(self) -> Optional[int]:
        """``image_size``, else the data set's default (None: native)."""
        return self.image_size if self.image_size is not None \
            else DEFAULT_IMAGE_SIZE.get(self.dataset)

    @property
    def takes_width(self) -> bool:
        return "width" in inspect.signature(MODELS[self.model]).parameters

    # ------------------------------------------------------------------ conversions

    def record(self) -> Dict[str, Any]:
        """The JSON-able record of the run (``metrics.json``'s ``config``, compared on
        resume): the fields, ``None`` for options that do not apply to this run, ``name``
        and ``image_size`` resolved."""
        up = self.uplink
        quant_up = up != "float32"
        return {
            "name": self.run_name, "model": self.model,
            "width": self.width if self.takes_width else None,
            "dataset": self.dataset, "image_size": self.resolved_image_size,
            "train_subset": self.train_subset, "test_subset": self.test_subset,
            "eval_split": self.eval_split,
            "validation_size": self.validation_size if self.eval_split == "validation"
            else None,
            "clients": self.clients, "fraction": self.fraction, "rounds": self.rounds,
            "partition": self.partition,
            "alpha": self.alpha if self.partition == "dirichlet" else None,
            "classes_per_client": self.classes_per_client if self.partition == "shards"
            else None,
            "server_lr": self.server_lr, "server_momentum": self.server_momentum,
            "norm_bound": self.norm_bound, "client_time_limit_s": self.client_time_limit_s,
            "local_epochs": self.local_epochs, "batch_size": self.batch_size, "lr": self.lr,
            "momentum": self.momentum, "weight_decay": self.weight_decay,
            "weight_bits": self.weight_bits, "act_bits": self.act_bits,
            "first_last_bits": self.first_last_bits if self.quantized else None,
            "quant_init": self.quant_init, "grad_scale": self.grad_scale,
            "act_grad_count": self.act_grad_count,
            "step_size_lr_scale": self.step_size_lr_scale,
            "uplink": up, "uplink_compression": self.uplink_compression,
            "stochastic": self.stochastic if quant_up else None,
            "error_feedback": self.error_feedback if quant_up else None,
            "downlink": self.downlink, "seed": self.seed, "device": self.device,
            "eval_integer": self.eval_integer and self.quantized,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ExperimentConfig":
        """The configuration a :meth:`record` (e.g. a run's ``metrics.json`` ``config``)
        describes: ``None`` of an option that did not apply reads as its default; keys of
        options added later (absent from older records) read as their default."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields)
        if unknown:
            raise ValueError(f"record has keys that are no ExperimentConfig field: "
                             f"{unknown[:5]}")
        kw = {k: v for k, v in record.items()
              if not (v is None and k in _BY_FIELD and not _BY_FIELD[k].nullable)}
        return cls(**kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "ExperimentConfig":
        """The configuration of options parsed by a parser with :func:`add_arguments`;
        ``overrides`` replace fields (e.g. the arms of ``oqfl-fl --compare``)."""
        kw = {o.field: getattr(args, o.field) for o in _OPTIONS}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *,
                     what: str = "run config") -> "ExperimentConfig":
        """The configuration of ``{option: value}`` with options named as on the command
        line without ``--`` (``train-subset``): the values are the command line's text or
        TOML-like values (``true``/``false`` for the switches, numbers, ``"float"`` bits,
        ``"all"``), ``"none"`` is ``None`` where an option takes it; checked exactly as the
        command line checks them. Unknown options raise ValueError (a typo must not silently
        run the defaults), as do bad values (``what`` starts the message)."""
        unknown = sorted(set(options) - set(_BY_KEY))
        if unknown:
            raise ValueError(f"{what}: unknown keys {unknown}; expected some of "
                             f"{sorted(_BY_KEY)}")
        argv: List[str] = []
        for key, value in options.items():
            opt = _BY_KEY[key]
            if _is_switch(opt):
                if not isinstance(value, bool):
                    raise ValueError(f"{what} {key}: expected true or false, got {value!r}")
                argv.append(opt.flag if value else "--no-" + key)
            elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"{what} {key}: expected a number or text, got {value!r}")
            else:  # --flag=value: a value that starts with "-" is not taken for an option
                argv.append(f"{opt.flag}={value}")
        parser = _RaisingParser(add_help=False)
        add_arguments(parser, nullable_none=True)
        try:
            args = parser.parse_args(argv)
            return cls.from_args(args)
        except ValueError as e:
            text = str(e.detail if isinstance(e, ConfigError) else e)
            if isinstance(e, ConfigError):
                raise ValueError(f"{what} {e.option[2:]}: {text}") from None
            raise ValueError(f"{what} {text.replace('argument --', '', 1)}") from None

    def options(self) -> Dict[str, Any]:
        """``{option: value}`` of every field (but ``name``) that :meth:`from_options` reads
        back to this configuration: switches as bools, ``None`` as ``"none"``."""
        return {o.flag[2:]: "none" if getattr(self, o.field) is None else getattr(self, o.field)
                for o in _OPTIONS}


_FLOAT_PARSERS = (parse_fraction, parse_positive_float, parse_nonneg_float, parse_momentum)


def _is_switch(opt: _Option) -> bool:
    return opt.parse is None and opt.choices is None


def _checked(opt: _Option, value):
    """``value`` of ``opt`` as the command line would have parsed it, or ConfigError."""
    def bad(detail):
        raise ConfigError(opt.field, opt.flag, detail)

    if value is None:
        if not opt.nullable:
            bad("expected a value, got None")
        return None
    if _is_switch(opt):
        if not isinstance(value, bool):
            bad(f"expected True or False, got {value!r:.80}")
        return value
    if opt.choices is not None:
        if value not in opt.choices:
            bad(f"expected one of {opt.choices}, got {value!r:.80}")
        return value
    if opt.parse is str:
        if not isinstance(value, str):
            bad(f"expected text, got {value!r:.80}")
        return value
    want_float = opt.parse in _FLOAT_PARSERS
    if isinstance(value, bool) or not isinstance(value, (float, int) if want_float else int):
        bad(f"expected {'a number' if want_float else 'an integer'}, got {value!r:.80}")
    try:
        parsed = opt.parse(repr(float(value)) if want_float else str(value))
    except argparse.ArgumentTypeError as e:
        bad(str(e))
    if parsed is None:  # "none"-like text of a number cannot happen; bits 32 can
        bad(f"expected bits in 2..8 or None (float), got {value!r:.80}")
    return float(parsed) if want_float else int(parsed)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # ValueError instead of printing usage and exiting
        raise ValueError(message)


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str):
        return None if text.strip().lower() == "none" else parse(text)
    parse_or_none.__name__ = parse.__name__
    return parse_or_none


def add_arguments(parser: argparse.ArgumentParser, *,
                  nullable_none: bool = False) -> Dict[str, Any]:
    """Adds one option per :class:`ExperimentConfig` field (but ``name``) to ``parser``, with
    the config's defaults, in the argument groups ``model and data``, ``federation``, ``local
    training``, ``quantization and codecs`` and ``run``; returns the groups by title (for the
    caller's own options). ``nullable_none``: ``none`` is also accepted for every option whose
    value may be None."""
    defaults = ExperimentConfig()
    groups: Dict[str, Any] = {}
    for opt in _OPTIONS:
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        kw: Dict[str, Any] = {"dest": opt.field, "default": getattr(defaults, opt.field),
                              "help": opt.help}
        if _is_switch(opt):
            kw["action"] = argparse.BooleanOptionalAction
        elif opt.choices is not None:
            kw["choices"] = opt.choices
        else:
            kw["type"] = _none_or(opt.parse) if nullable_none and opt.nullable else opt.parse
        if opt.metavar:
            kw["metavar"] = opt.metavar
        groups[opt.group].add_argument(opt.flag, **kw)
    return groups


def check_device(text: str) -> torch.device:
    """The torch device ``text`` names if this machine has it, else ValueError saying what is
    expected."""
    expected = "expected cpu, cuda or cuda:N (N below the number of GPUs)"
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"{expected}, got {text!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):  # e.g. meta: no data, the run cannot work
        raise ValueError(f"{expected}, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{text!r} but CUDA is not available; expected cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise ValueError(f"{expected}, got {text!r} with {torch.cuda.device_count()} GPU(s)")
    return device


# ----------------------------------------------------------------------------------------------
# data

def load_dataset(name: str, data_dir: Optional[str] = None, *,
                 train_limit: Optional[int] = None, test_limit: Optional[int] = None):
    """``(train_x, train_y, test_x, test_y)`` for ``name`` in :data:`DATASETS`: images float32
    NCHW, scaled and standardized with the data set's published statistics (the loaders'
    ``normalize=True``), labels int64; ``*_limit`` keep the first examples of a split.

    ``data_dir``: fashion-mnist: the folder of the idx files (default: ``$OQFL_DATA`` when it
    holds them, else ``$OQFL_FASHION_MNIST`` or the Debian package's folder); cifar10: the
    folder of the python batches (default ``$OQFL_DATA``); digits: unused (scikit-learn's
    bundled 8x8 digits, split 80/20 per class with seed 0). Missing or unreadable files
    raise :class:`ExperimentError`."""
    from .. import data
    if name == "fashion-mnist":
        root = data_dir
        env = os.environ.get("OQFL_DATA")
        if root is None and env and data.fashion_mnist_dir(env) is not None:
            root = env
        load = lambda split, limit: data.load_fashion_mnist(split, root=root, limit=limit,
                                                            normalize=True)
    elif name == "cifar10":
        load = lambda split, limit: data.load_cifar10(data_dir, split=split, limit=limit,
                                                      normalize=True)
    elif name == "digits":
        load = lambda split, limit: data.load_digits(split, limit=limit, normalize=True)
    else:
        raise ExperimentError(f"--dataset expected one of {DATASETS}, got {name!r}")
    try:
        tx, ty = load("train", train_limit)
        vx, vy = load("test", test_limit)
    except (FileNotFoundError, ValueError) as e:
        raise ExperimentError(f"--dataset {name}: {e}") from None
    return tx, ty, vx, vy


def _resize(x: Tensor, size: Optional[int]) -> Tensor:
    if size is None or size == x.shape[-1]:
        return x
    if size > x.shape[-1]:
        raise ExperimentError(f"--image-size {size} is larger than the images "
                              f"({x.shape[-1]})")
    return F.adaptive_avg_pool2d(x, size)


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """The training and evaluation split of a run (images float32 NCHW, labels int64);
    ``test_*`` is the validation set under ``eval_split="validation"``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        """The largest label of either split, plus one."""
        top = int(self.train_y.max())
        if len(self.test_y):
            top = max(top, int(self.test_y.max()))
        return top + 1

    @property
    def model_shape(self) -> Tuple[int, int, int]:
        """``(in_channels, num_classes, image_size)`` for :func:`model_fn`."""
        return int(self.train_x.shape[1]), self.num_classes, int(self.train_x.shape[-1])


def load_data(cfg: ExperimentConfig, data_dir: Optional[str] = None,
              cache: Optional[dict] = None) -> ExperimentData:
    """The first ``train_subset`` / ``test_subset`` examples of ``cfg.dataset``
    (:func:`load_dataset`), average-pooled to ``cfg.resolved_image_size``. With
    ``eval_split="validation"`` the evaluation split is the last ``validation_size`` training
    images instead of the test set, and the training examples are the first ``train_subset``
    of the others (never the same images). ``cache``: a dict that keeps loaded data for
    configurations with the same data options."""
    size = cfg.resolved_image_size
    validation = cfg.eval_split == "validation"
    key = (cfg.dataset, data_dir, size, cfg.train_subset, cfg.test_subset, cfg.eval_split,
           cfg.validation_size)
    if cache is not None and key in cache:
        return cache[key]
    if validation:
        tx, ty, _, _ = load_dataset(cfg.dataset, data_dir, test_limit=1)
        n_val = cfg.validation_size
        pool = len(ty) - n_val
        if pool < 1 or (cfg.train_subset is not None and cfg.train_subset > pool):
            want = "more than" if cfg.train_subset is None else f"{cfg.train_subset} +"
            raise ExperimentError(
                f"--eval-split validation --validation-size {n_val}: the {len(ty)} training "
                f"images of {cfg.dataset} are too few for {want} {n_val} held out; lower "
                "--validation-size or --train-subset")
        vx, vy = tx[pool:], ty[pool:]
        tx, ty = tx[:pool][:cfg.train_subset], ty[:pool][:cfg.train_subset]
    else:
        tx, ty, vx, vy = load_dataset(cfg.dataset, data_dir, train_limit=cfg.train_subset,
                                      test_limit=cfg.test_subset)
    out = ExperimentData(_resize(tx, size).contiguous(), ty, _resize(vx, size).contiguous(), vy)
    if cache is not None:
        cache[key] = out
    return out


def make_partitions(cfg: ExperimentConfig, labels: Tensor) -> List[Tensor]:
    """The indices of each client's training examples (``cfg.partition`` with
    ``cfg.seed``); a split the data cannot give raises :class:`ExperimentError`."""
    from .. import data
    k, seed, how = cfg.clients, cfg.seed, cfg.partition
    if k > len(labels):
        raise ExperimentError(f"--clients {k} is more than the {len(labels)} training "
                              "examples")
    try:
        if how == "iid":
            return data.partition_iid(labels, k, seed=seed)
        if how == "dirichlet":
            return data.partition_dirichlet(labels, k, cfg.alpha, seed=seed)
        return data.partition_shards(labels, k, cfg.classes_per_client, seed=seed)
    except ValueError as e:  # a split these options cannot give from this data
        options = {"dirichlet": f" --alpha {cfg.alpha}",
                   "shards": f" --classes-per-client {cfg.classes_per_client}"}.get(how, "")
        raise ExperimentError(f"--partition {how} --clients {k}{options} on {len(labels)} "
                              f"training examples: {e}") from None


# ----------------------------------------------------------------------------------------------
# model, clients, server

def model_fn(cfg: ExperimentConfig, in_channels: int, num_classes: int,
             image_size: int) -> Callable[[], nn.Module]:
    """Builds ``cfg.model`` for that input on ``cfg.device``; a quantized configuration
    quantizes it with :func:`oqfl_ext.nn.quantize_model` (``first_last_bits`` float keeps the
    first and last layers float)."""
    from ..models import create
    from ..nn import edge_layers, quantize_model
    kwargs = {"width": cfg.width} if cfg.takes_width else {}
    device = torch.device(cfg.device)
    grad_factor = 1.0 if cfg.grad_scale == "none" else None

    def build() -> nn.Module:
        m = create(cfg.model, in_channels=in_channels, num_classes=num_classes,
                   image_size=image_size, **kwargs)
        if cfg.quantized:
            edge_bits = cfg.first_last_bits
            # quantize_model's first_last_bits=None means "no exception"; float means float
            keep_float = {} if edge_bits is not None else \
                {name: None for name in edge_layers(m)}
            m = quantize_model(m, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits,
                               first_last_bits=edge_bits, overrides=keep_float, inplace=True,
                               init=cfg.quant_init, grad_factor=grad_factor,
                               act_grad_count=cfg.act_grad_count)
        return m.to(device)

    return build


def initial_template(cfg: ExperimentConfig, in_channels: int, num_classes: int,
                     image_size: int) -> Optional[Dict[str, Tensor]]:
    """The compressed downlink's initial template (:mod:`oqfl_ext.fl.downlink`, "First
    contact"): the state (CPU) of :func:`model_fn`'s model built under ``cfg.seed``
    (:func:`oqfl_ext.fl.server.initial_model`, the server's own construction: its initial
    model is this one plus calibration, the global RNG stream is untouched), which the server
    and every client (a Flower SuperNode too) build from the configuration. None when
    ``cfg.downlink`` is not a delta downlink, or when two builds differ (the construction
    draws on randomness the seed does not fix): first contact is then a full snapshot."""
    if cfg.downlink not in DELTA_DOWNLINKS:
        return None
    build = model_fn(cfg, in_channels, num_classes, image_size)
    states = [{k: v.detach().cpu() for k, v in initial_model(build, cfg.seed).state_dict()
               .items()} for _ in range(2)]
    if state_digest(states[0]) != state_digest(states[1]):
        import logging
        logging.getLogger("oqfl_ext.fl").warning(
            "the model's construction is not deterministic under the seed: first contact of "
            "the %s downlink is a full snapshot", cfg.downlink)
        return None
    return states[0]


def client_config(cfg: ExperimentConfig) -> ClientConfig:
    """The clients' settings; ``stochastic`` and ``error_feedback`` are off with a float32
    uplink (as its record says: they do not apply)."""
    quant_up = cfg.uplink != "float32"
    return ClientConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        uplink_bits=UPLINKS[cfg.uplink], stochastic=cfg.stochastic and quant_up,
                        error_feedback=cfg.error_feedback and quant_up,
                        uplink_compression=cfg.uplink_compression,
                        step_size_lr_scale=cfg.step_size_lr_scale)


def client_id(cfg: ExperimentConfig, index: int) -> str:
    """``client-<index>``, zero-padded to the width of the last index."""
    return f"client-{index:0{len(str(cfg.clients - 1))}d}"


def client_seed(cfg: ExperimentConfig, index: int) -> int:
    return derive_seed(cfg.seed, 0xC1, index)


_BUILD: Any = object()  # make_client / make_server: build the initial template here


def make_client(cfg: ExperimentConfig, data: ExperimentData, parts: Sequence[Tensor],
                index: int, template: Optional[Dict[str, Tensor]] = _BUILD) -> Client:
    """Client ``index``: its partition of the training set, :func:`client_config`,
    :func:`client_seed`, and ``template`` (default: :func:`initial_template`, built here)."""
    check_int("index", index, minimum=0, maximum=cfg.clients - 1)
    if template is _BUILD:
        template = initial_template(cfg, *data.model_shape)
    p = parts[index]
    return Client(client_id(cfg, index), (data.train_x[p], data.train_y[p]),
                  client_config(cfg), seed=client_seed(cfg, index), initial_template=template)


def make_clients(cfg: ExperimentConfig, data: ExperimentData, parts: Sequence[Tensor],
                 template: Optional[Dict[str, Tensor]] = _BUILD) -> List[Client]:
    if template is _BUILD:
        template = initial_template(cfg, *data.model_shape)
    return [make_client(cfg, data, parts, i, template) for i in range(cfg.clients)]


def make_server(cfg: ExperimentConfig, data: ExperimentData, parts: Sequence[Tensor],
                clients: Sequence, template: Optional[Dict[str, Tensor]] = _BUILD) -> Server:
    """The :class:`~oqfl_ext.fl.Server`: ``clients`` stand for partitions 0..N-1 in order
    (in-process clients, or :class:`~oqfl_ext.fl.RemoteClient` s whose training happens
    elsewhere); the quantizers are calibrated on the first :data:`CALIBRATION_SIZE` examples
    of partition 0; the test set lives on ``cfg.device``; ``template``: the downlink's
    initial template (default: :func:`initial_template`, built here)."""
    device = torch.device(cfg.device)
    if template is _BUILD:
        template = initial_template(cfg, *data.model_shape)
    return Server(model_fn(cfg, *data.model_shape),
                  (data.test_x.to(device), data.test_y.to(device)), clients=clients,
                  fraction=cfg.fraction, server_lr=cfg.server_lr,
                  server_momentum=cfg.server_momentum, seed=cfg.seed,
                  norm_bound=cfg.norm_bound, client_time_limit_s=cfg.client_time_limit_s,
                  calibration_data=data.train_x[parts[0]][:CALIBRATION_SIZE],
                  downlink=cfg.downlink, evaluate_integer=cfg.eval_integer and cfg.quantized,
                  uplink_compression=cfg.uplink_compression, initial_template=template)


def post_training_baseline(cfg: ExperimentConfig, float_model: nn.Module,
                           data: ExperimentData, parts: Sequence[Tensor]) -> nn.Module:
    """The PTQ baseline of a quantized ``cfg``: ``float_model`` (e.g. FP32 FedAvg's final
    model) quantized as ``cfg`` quantizes (bits, first/last layers), step sizes calibrated on
    the images the server calibrates with (:func:`make_server`), no retraining
    (:func:`oqfl_ext.nn.post_training_quantize`)."""
    from ..nn import edge_layers, post_training_quantize
    if not cfg.quantized:
        raise ValueError("cfg expected a quantized configuration (weight_bits or act_bits)")
    keep_float = {} if cfg.first_last_bits is not None else \
        {name: None for name in edge_layers(float_model)}
    calibration = data.train_x[parts[0]][:CALIBRATION_SIZE].to(torch.device(cfg.device))
    return post_training_quantize(float_model, calibration, cfg.weight_bits, cfg.act_bits,
                                  first_last_bits=cfg.first_last_bits, overrides=keep_float)


class Built(NamedTuple):
    """What :func:`build` returns."""

    data: ExperimentData
    parts: List[Tensor]
    clients: List[Client]
    server: Server


def build(cfg: ExperimentConfig, data_dir: Optional[str] = None,
          cache: Optional[dict] = None) -> Built:
    """Data, partitions, in-process clients and server of ``cfg``."""
    data = load_data(cfg, data_dir, cache)
    parts = make_partitions(cfg, data.train_y)
    template = initial_template(cfg, *data.model_shape)  # once for every side
    clients = make_clients(cfg, data, parts, template)
    return Built(data, parts, clients, make_server(cfg, data, parts, clients, template))
