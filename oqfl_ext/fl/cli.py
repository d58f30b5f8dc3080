"""``oqfl-fl`` (also ``python -m oqfl_ext.fl``): federated training of a float or LSQ-quantized
CNN on simulated clients, with compressed uplink updates, per-round checkpoints and metrics.

One run writes into ``--out`` (default ``runs/<name>-<date>-<time>``):

* ``metrics.json`` -- the configuration and, per round, accuracy, loss, uplink and downlink
  bytes, wall time, accepted and dropped clients (:mod:`oqfl_ext.fl.metrics`); rewritten after
  every round;
* ``accuracy.png`` -- accuracy against round and against cumulative uplink MB;
* ``checkpoints/`` -- the server state after the last round (:mod:`oqfl_ext.fl.checkpoint`);
  ``--resume`` continues a killed run from it, bit-identically (in a folder without one it
  starts the run only when the folder is new or empty: it never overwrites other files);
* ``model.safetensors`` -- the final global model's ``state_dict()``.

``--compare`` runs FP32 FedAvg (float model, float32 uplink) and OQFL (the ``--weight-bits`` /
``--act-bits`` model with the ``--uplink`` codec; W4A4 int4 by default) with the same seed, data
partition and clients, into ``--out/fp32`` and ``--out/oqfl-w4a4``, then prints a table and writes
``compare.txt``, ``compare.json`` and ``compare.png`` into ``--out``.

Errors are one line on stderr, no traceback: options that cannot work exit with 2 (argparse's
usage errors), a run that cannot go on (missing data, a partition the data cannot give, an
existing or damaged run, an --out that cannot be written, a checkpoint that could not be
written -- the last good one is named and kept) with 1.

The Python entry points are :func:`main` (``main([...])`` returns the exit status),
:func:`build_config` and :func:`run_experiment`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .._io import atomic_write_bytes, encode_state
from .codec import COMPRESSIONS

__all__ = ["main", "build_parser", "build_config", "run_experiment", "compare_arms",
           "DATASETS", "load_dataset"]

logger = logging.getLogger("oqfl_ext.fl")

DATASETS = ("fashion-mnist", "cifar10", "digits")
PARTITIONS = ("iid", "dirichlet", "shards")
UPLINKS = {"float32": 32, "int8": 8, "int4": 4}
DOWNLINKS = ("float32", "int8")
MODEL_NAMES = ("small_cnn", "vgg", "resnet20", "mobilenet_v2")
_WIDTH_MODELS = ("small_cnn", "vgg")
# defaults sized for a run of a few minutes on 2 CPU cores (see the README)
DEFAULT_TRAIN_SUBSET = 20000
DEFAULT_IMAGE_SIZE = {"fashion-mnist": 14}


class UsageError(Exception):
    """A problem with the run's inputs (missing data, an existing run) reported as one line."""


# ----------------------------------------------------------------------------------------------
# argument types (their messages name the value; argparse prefixes the option)

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


# the partitioners take seeds below 2**63 (torch.manual_seed would take up to 2**64 - 1)
MAX_SEED = 2 ** 63 - 1


def _seed(text: str) -> int:
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


_fraction = _float_in(0.0, 1.0, True, False, "a number in (0, 1]")
_positive_float = _float_in(0.0, math.inf, True, True, "a positive number")
_nonneg_float = _float_in(0.0, math.inf, False, True, "a number >= 0")
_momentum = _float_in(0.0, 1.0, False, True, "a number in [0, 1)")


def _subset(text: str) -> Optional[int]:
    if text.strip().lower() == "all":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got "
                                         f"{text!r}") from None


def _bits(text: str) -> Optional[int]:
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


def _bits_text(bits: Optional[int]) -> str:
    return "float" if bits is None else str(bits)


# ----------------------------------------------------------------------------------------------
# the parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oqfl-fl",
        description="Federated training (FedAvg/FedAvgM) of a float or LSQ-quantized CNN on "
                    "simulated clients, with quantized uplink updates. The defaults run a "
                    "short OQFL W4A4 experiment on Fashion-MNIST; --compare runs FP32 FedAvg "
                    "and OQFL side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=MODEL_NAMES, default="small_cnn", help="network")
    g.add_argument("--width", type=_positive_int, default=16,
                   help="channels of the first stage (small_cnn, vgg)")
    g.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="data set")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the data set's files (default: $OQFL_DATA; "
                        "fashion-mnist also looks in the Debian package's folder; digits "
                        "needs none)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="average-pool the images down to this side (default: 14 for "
                        "fashion-mnist, 4x cheaper than its native 28; native otherwise)")
    g.add_argument("--train-subset", type=_subset, default=DEFAULT_TRAIN_SUBSET,
                   metavar="{N,all}", help="use the first N training examples only")
    g.add_argument("--test-subset", type=_subset, default=None, metavar="{N,all}",
                   help="evaluate on the first N test examples only (default: all)")
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=_positive_int, default=10, help="number of clients")
    g.add_argument("--fraction", type=_fraction, default=0.5,
                   help="share of the clients sampled per round")
    g.add_argument("--rounds", type=_positive_int, default=10, help="federated rounds")
    g.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="how the training set is split among the clients")
    g.add_argument("--alpha", type=_positive_float, default=0.5,
                   help="Dirichlet concentration (--partition dirichlet)")
    g.add_argument("--classes-per-client", type=_positive_int, default=2,
                   help="classes per client (--partition shards)")
    g.add_argument("--server-lr", type=_positive_float, default=1.0, help="server learning rate")
    g.add_argument("--server-momentum", type=_momentum, default=0.0,
                   help="FedAvgM server momentum (0: FedAvg)")
    g.add_argument("--norm-bound", type=_positive_float, default=None,
                   help="clip each update's L2 norm to this")
    g.add_argument("--client-time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="drop a client that takes longer than this in a round")
    g = p.add_argument_group("local training")
    g.add_argument("--local-epochs", type=_positive_int, default=1, help="epochs per round")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="mini-batch size")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="client learning rate")
    g.add_argument("--momentum", type=_momentum, default=0.9, help="client SGD momentum")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="client weight decay")
    g = p.add_argument_group("quantization and codecs")
    g.add_argument("--weight-bits", type=_bits, default=4, metavar="{2..8,float}",
                   help="bits of the weights (LSQ), or float")
    g.add_argument("--act-bits", type=_bits, default=4, metavar="{2..8,float}",
                   help="bits of the layer inputs (LSQ), or float")
    g.add_argument("--first-last-bits", type=_bits, default=8, metavar="{2..8,float}",
                   help="bits of the first and last layers of a quantized model, or float")
    g.add_argument("--quant-init", choices=("mse", "lsq"), default="mse",
                   help="how the server sets every step size before round 1 from a batch of "
                        "the first client: the range with the least squared error (mse) or "
                        "LSQ's 2 mean|x| / sqrt(qmax) (lsq)")
    g.add_argument("--grad-scale", choices=("lsq", "none"), default="lsq",
                   help="gradient scale of the step sizes and offsets: LSQ's "
                        "1/sqrt(elements x qmax), or none (1)")
    g.add_argument("--step-size-lr-scale", type=_positive_float, default=1.0,
                   help="the clients' learning rate of step sizes and offsets, as a multiple "
                        "of --lr")
    g.add_argument("--uplink", choices=tuple(UPLINKS), default="int4",
                   help="codec of the client updates")
    g.add_argument("--uplink-compression", choices=COMPRESSIONS, default="none",
                   help="entropy-code each update blob (zlib: lossless, DEFLATE level 6; "
                        "about a third fewer bytes for int4 updates, 12 %% for float32)")
    g.add_argument("--stochastic", action=argparse.BooleanOptionalAction, default=True,
                   help="unbiased stochastic rounding of the uplink codes (otherwise round "
                        "half to even)")
    g.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True,
                   help="clients keep their uplink quantization error for the next round")
    g.add_argument("--downlink", choices=DOWNLINKS, default="float32",
                   help="codec of the global model sent to the clients")
    g.add_argument("--eval-integer", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the quantized global model converted to integer "
                        "inference (oqfl_ext.convert) every round")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seeds the model, the partition, the sampling and the clients")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<name>-<date>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    g.add_argument("--compare", action="store_true",
                   help="run FP32 FedAvg and OQFL (--weight-bits/--act-bits/--uplink) with the "
                        "same seed and print a table")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    g.add_argument("--threads", type=_nonneg_int, default=1,
                   help="torch CPU threads; 0: torch's default (one per core). The default "
                        "models are too small for intra-op parallelism to pay: on a 2-core "
                        "machine with other work running, 2 threads were 10x slower than 1")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# configuration

def build_config(args: argparse.Namespace, *, weight_bits=..., act_bits=..., uplink=None,
                 name: Optional[str] = None) -> dict:
    """The JSON-able configuration of one run from parsed arguments (overrides for the
    --compare arms). Keys are the option names with ``_``; bits are ints or ``None`` (float)."""
    wb = args.weight_bits if weight_bits is ... else weight_bits
    ab = args.act_bits if act_bits is ... else act_bits
    up = uplink or args.uplink
    quantized = wb is not None or ab is not None
    if name is None:
        name = f"oqfl-w{_bits_text(wb)}a{_bits_text(ab)}" if quantized else "fp32"
        name = name.replace("float", "f")
    return {
        "name": name, "model": args.model,
        "width": args.width if args.model in _WIDTH_MODELS else None,
        "dataset": args.dataset,
        "image_size": args.image_size if args.image_size is not None
        else DEFAULT_IMAGE_SIZE.get(args.dataset),
        "train_subset": args.train_subset, "test_subset": args.test_subset,
        "clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
        "partition": args.partition,
        "alpha": args.alpha if args.partition == "dirichlet" else None,
        "classes_per_client": args.classes_per_client if args.partition == "shards" else None,
        "server_lr": args.server_lr, "server_momentum": args.server_momentum,
        "norm_bound": args.norm_bound, "client_time_limit_s": args.client_time_limit,
        "local_epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay,
        "weight_bits": wb, "act_bits": ab,
        "first_last_bits": args.first_last_bits if quantized else None,
        "quant_init": args.quant_init, "grad_scale": args.grad_scale,
        "step_size_lr_scale": args.step_size_lr_scale,
        "uplink": up, "uplink_compression": args.uplink_compression,
        "stochastic": args.stochastic if up != "float32" else None,
        "error_feedback": args.error_feedback if up != "float32" else None,
        "downlink": args.downlink, "seed": args.seed, "device": args.device,
        "eval_integer": args.eval_integer and quantized,
    }


def compare_arms(args: argparse.Namespace) -> List[dict]:
    """The two --compare configurations: FP32 FedAvg (float model, float32 uplink) and OQFL
    (the parsed bits and uplink; W4A4 with an int4 uplink by default)."""
    fp32 = build_config(args, weight_bits=None, act_bits=None, uplink="float32", name="fp32")
    wb, ab = args.weight_bits, args.act_bits
    oqfl = build_config(args)
    if wb is None and ab is None and args.uplink == "float32":
        raise UsageError("--compare: the OQFL arm would be FP32 too; give --weight-bits/"
                         "--act-bits or a quantized --uplink")
    return [fp32, oqfl]


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
    bundled 8x8 digits, split 80/20 per class with seed 0)."""
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
        raise UsageError(f"--dataset expected one of {DATASETS}, got {name!r}")
    try:
        tx, ty = load("train", train_limit)
        vx, vy = load("test", test_limit)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--dataset {name}: {e}") from None
    return tx, ty, vx, vy


def _resize(x: Tensor, size: Optional[int]) -> Tensor:
    if size is None or size == x.shape[-1]:
        return x
    if size > x.shape[-1]:
        raise UsageError(f"--image-size {size} is larger than the images ({x.shape[-1]})")
    return F.adaptive_avg_pool2d(x, size)


# ----------------------------------------------------------------------------------------------
# one run

def _partition(cfg: dict, labels: Tensor) -> List[Tensor]:
    from .. import data
    k, seed, how = cfg["clients"], cfg["seed"], cfg["partition"]
    try:
        if how == "iid":
            return data.partition_iid(labels, k, seed=seed)
        if how == "dirichlet":
            return data.partition_dirichlet(labels, k, cfg["alpha"], seed=seed)
        return data.partition_shards(labels, k, cfg["classes_per_client"], seed=seed)
    except ValueError as e:  # a split these options cannot give from this data
        options = {"dirichlet": f" --alpha {cfg['alpha']}",
                   "shards": f" --classes-per-client {cfg['classes_per_client']}"}.get(how, "")
        raise UsageError(f"--partition {how} --clients {k}{options} on {len(labels)} training "
                         f"examples: {e}") from None


def _model_fn(cfg: dict, in_channels: int, num_classes: int, image_size: int):
    from ..models import create
    from ..nn import edge_layers, quantize_model
    from ..nn.quantizer import LSQQuantizer
    kwargs = {"width": cfg["width"]} if cfg["model"] in _WIDTH_MODELS else {}
    device = torch.device(cfg["device"])
    wb, ab = cfg["weight_bits"], cfg["act_bits"]

    def model_fn():
        m = create(cfg["model"], in_channels=in_channels, num_classes=num_classes,
                   image_size=image_size, **kwargs)
        if wb is not None or ab is not None:
            edge_bits = cfg["first_last_bits"]
            # quantize_model's first_last_bits=None means "no exception"; float means float
            keep_float = {} if edge_bits is not None else \
                {name: None for name in edge_layers(m)}
            m = quantize_model(m, weight_bits=wb, act_bits=ab, first_last_bits=edge_bits,
                               overrides=keep_float, inplace=True)
            for q in m.modules():
                if isinstance(q, LSQQuantizer):
                    q.init = cfg.get("quant_init", "mse")
                    if cfg.get("grad_scale", "lsq") == "none":
                        q.grad_factor = 1.0
        return m.to(device)

    return model_fn


def _save_model(path: Path, model) -> None:
    atomic_write_bytes(path, encode_state(model.state_dict()))


def _prepare_data(cfg: dict, data_dir: Optional[str], cache: Optional[dict]):
    key = (cfg["dataset"], data_dir, cfg["image_size"], cfg["train_subset"], cfg["test_subset"])
    if cache is not None and key in cache:
        return cache[key]
    tx, ty, vx, vy = load_dataset(cfg["dataset"], data_dir, train_limit=cfg["train_subset"],
                                  test_limit=cfg["test_subset"])
    tx, vx = _resize(tx, cfg["image_size"]), _resize(vx, cfg["image_size"])
    out = (tx.contiguous(), ty, vx.contiguous(), vy)
    if cache is not None:
        cache[key] = out
    return out


def run_experiment(cfg: dict, out, *, resume: bool = False, progress: bool = True,
                   data_dir: Optional[str] = None, data_cache: Optional[dict] = None,
                   position: int = 0) -> Tuple[List[dict], Any]:
    """Runs (or with ``resume`` continues) the experiment ``cfg`` (from :func:`build_config`)
    in the folder ``out``; writes the files listed in the module docstring and returns
    ``(metrics records, server)``."""
    from tqdm.auto import tqdm

    from ..data import partition_stats
    from .client import Client, ClientConfig, derive_seed
    from .checkpoint import CHECKPOINT_JSON, has_checkpoint
    from .metrics import METRICS_FILE, save_run, write_metrics
    from .server import Server

    out = Path(out)
    _check_out_folder(out)
    ckpt_dir = out / "checkpoints"
    if has_checkpoint(ckpt_dir) and not resume:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose "
                         "another --out")
    if resume and not has_checkpoint(ckpt_dir) and out.is_dir() and any(out.iterdir()):
        # a mistyped --out, or a run whose checkpoint is gone: starting over would overwrite
        # its metrics and model and delete orphaned checkpoint files
        raise UsageError(f"--resume: {out} holds no checkpoint ({ckpt_dir / CHECKPOINT_JSON} "
                         "not found) but is not empty; check --out (a new run needs a new or "
                         "empty folder)")
    tx, ty, vx, vy = _prepare_data(cfg, data_dir, data_cache)
    num_classes = int(max(int(ty.max()), int(vy.max()) if len(vy) else 0)) + 1
    if cfg["clients"] > len(ty):
        raise UsageError(f"--clients {cfg['clients']} is more than the {len(ty)} training "
                         "examples")
    parts = _partition(cfg, ty)
    logger.debug("partition:\n%s", partition_stats(ty, parts))
    ccfg = ClientConfig(local_epochs=cfg["local_epochs"], batch_size=cfg["batch_size"],
                        lr=cfg["lr"], momentum=cfg["momentum"],
                        weight_decay=cfg["weight_decay"], uplink_bits=UPLINKS[cfg["uplink"]],
                        stochastic=bool(cfg["stochastic"]),
                        error_feedback=bool(cfg["error_feedback"]),
                        uplink_compression=cfg.get("uplink_compression", "none"),
                        step_size_lr_scale=cfg.get("step_size_lr_scale", 1.0))
    width = len(str(cfg["clients"] - 1))
    clients = [Client(f"client-{i:0{width}d}", (tx[p], ty[p]), ccfg,
                      seed=derive_seed(cfg["seed"], 0xC1, i)) for i, p in enumerate(parts)]
    model_fn = _model_fn(cfg, tx.shape[1], num_classes, tx.shape[-1])
    device = torch.device(cfg["device"])
    server = Server(model_fn, (vx.to(device), vy.to(device)), clients=clients,
                    fraction=cfg["fraction"], server_lr=cfg["server_lr"],
                    server_momentum=cfg["server_momentum"], seed=cfg["seed"],
                    norm_bound=cfg["norm_bound"],
                    client_time_limit_s=cfg["client_time_limit_s"], downlink=cfg["downlink"],
                    evaluate_integer=bool(cfg.get("eval_integer")),
                    uplink_compression=cfg.get("uplink_compression", "none"))
    out.mkdir(parents=True, exist_ok=True)
    rounds_total = cfg["rounds"]
    bar = tqdm(total=rounds_total, desc=cfg["name"], unit="round", disable=not progress,
               position=position, leave=True, dynamic_ncols=True, file=sys.stderr)
    state = {"records": [], "up": 0}

    def on_client(i, m, cid):
        if i < m:
            bar.set_postfix_str(f"round {server.round + 1}: client {i + 1}/{m}", refresh=True)
        else:
            bar.set_postfix_str(f"round {server.round + 1}: aggregating, evaluating",
                                refresh=True)

    def on_round(record, result):
        state["records"].append(record)
        state["up"] += record["uplink_bytes"]
        write_metrics(out / METRICS_FILE, cfg, state["records"])
        bar.set_postfix_str(_postfix(record, state["up"]), refresh=False)
        bar.update(1)
        for cid, reason in result.dropped:
            bar.write(f"{cfg['name']} round {result.round + 1}: dropped {cid}: {reason}")

    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm(loggers=[logger]):
            if resume and has_checkpoint(ckpt_dir):
                from .checkpoint import load_checkpoint
                done = load_checkpoint(ckpt_dir).rounds
                state["records"] = list(done)
                state["up"] = sum(int(r["uplink_bytes"]) for r in done)
                if done:
                    bar.update(min(len(done), rounds_total))
                    bar.set_postfix_str(_postfix(done[-1], state["up"]) + " (resumed)")
            records = server.fit(rounds_total, checkpoint_dir=ckpt_dir, config=cfg,
                                 resume=resume, on_round=on_round, on_client=on_client)
    finally:
        bar.close()
    if len(records) > rounds_total:
        logger.warning("%s: the checkpoint is past --rounds %d (%d rounds run)", out,
                       rounds_total, len(records))
    save_run(out, cfg, records, title=f"{cfg['name']}: {cfg['model']} on {cfg['dataset']}")
    _save_model(out / "model.safetensors", server.model)
    return records, server


def _check_out_folder(out: Path) -> None:
    """Refuses an output folder that cannot be one: it, or a folder above it, is a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--out {out}: {p} is a file, not a folder")
            return


def _postfix(record: dict, up_bytes: int) -> str:
    acc = record.get("accuracy")
    acc_s = "n/a" if acc is None or not math.isfinite(acc) else f"{100 * acc:.2f}%"
    return f"acc {acc_s}, up {up_bytes / 1e6:.2f} MB"


# ----------------------------------------------------------------------------------------------
# main

def _default_out(cfg_name: str, compare: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{'compare' if compare else cfg_name}-{stamp}"


def _summary_line(name: str, records: List[dict], out: Path) -> str:
    from .metrics import summarize
    s = summarize(records)
    acc = s["final_accuracy"]
    acc_s = "n/a" if not math.isfinite(acc) else f"{100 * acc:.2f}%"
    return (f"{name}: {s['rounds']} rounds, final accuracy {acc_s}, uplink "
            f"{s['uplink_mb']:.2f} MB, {s['time_per_round_s']:.1f} s/round -> {out}")


def _check_runtime_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.resume and args.out is None:
        parser.error("argument --resume: needs --out FOLDER, the run to continue")
    if args.downlink != "float32":
        from .server import downlink_codec
        try:
            downlink_codec(args.downlink)
        except ValueError as e:
            parser.error(f"argument --downlink: {e}")
    expected = "expected cpu, cuda or cuda:N (N below the number of GPUs)"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"argument --device: {expected}, got {args.device!r} ({e})")
    if device.type not in ("cpu", "cuda"):  # e.g. meta: no data, the run cannot work
        parser.error(f"argument --device: {expected}, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device!r} but CUDA is not available; "
                     "expected cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        parser.error(f"argument --device: {expected}, got {args.device!r} with "
                     f"{torch.cuda.device_count()} GPU(s)")
    from ..models import MODELS
    minimum = MODELS[args.model].min_image_size
    if args.image_size is not None and args.image_size < minimum:
        parser.error(f"argument --image-size: {args.model} needs {minimum} or more, got "
                     f"{args.image_size}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``oqfl-fl`` command; returns the exit status (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_runtime_options(parser, args)
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:  # main([...]) called in-process leaves torch's thread count as it found it
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, CheckpointWriteError
    out = Path(args.out) if args.out else None
    try:
        configs = compare_arms(args) if args.compare else [build_config(args)]
        out = Path(args.out) if args.out else _default_out(configs[0]["name"], args.compare)
        _check_out_folder(out)
        if not args.resume and out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out} exists and is not empty; choose another folder "
                             "(or --resume a run there)")
        progress = not args.quiet
        cache: Dict[Any, Any] = {}
        results = []
        t0 = time.perf_counter()
        for pos, cfg in enumerate(configs):
            folder = out / cfg["name"] if args.compare else out
            records, _ = run_experiment(cfg, folder, resume=args.resume, progress=progress,
                                        data_dir=args.data_dir, data_cache=cache)
            results.append((cfg["name"], records, folder))
            print(_summary_line(cfg["name"], records, folder), flush=True)
        if args.compare:
            _write_comparison(out, configs, results, time.perf_counter() - t0)
    except (UsageError, CheckpointError) as e:
        print(f"oqfl-fl: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only folder (a failed checkpoint names its last)
        named = e.filename is not None or isinstance(e, CheckpointWriteError) or out is None
        where = "" if named else f" (writing the run in {out})"
        print(f"oqfl-fl: error: {e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oqfl-fl: interrupted; continue with --resume --out <the same folder>",
              file=sys.stderr)
        return 130
    return 0


def _write_comparison(out: Path, configs: List[dict], results, elapsed: float) -> None:
    from .metrics import format_table, plot_runs, summarize, _jsonable
    runs = [(name, records) for name, records, _ in results]
    labels = {"fp32": "FP32 FedAvg"}
    named = [(labels.get(name, name.upper().replace("OQFL-", "OQFL ")), recs)
             for name, recs in runs]
    table = format_table(named)
    cfg = configs[-1]
    head = (f"{cfg['model']} on {cfg['dataset']}, {cfg['clients']} clients "
            f"({cfg['partition']}), fraction {cfg['fraction']}, {cfg['rounds']} rounds, seed "
            f"{cfg['seed']}; OQFL: W{_bits_text(cfg['weight_bits'])}A{_bits_text(cfg['act_bits'])}"
            f", {cfg['uplink']} uplink; {elapsed:.0f} s in all")
    text = head + "\n" + table + "\n"
    print("\n" + text, end="", flush=True)
    atomic_write_bytes(out / "compare.txt", text.encode())
    doc = {"configs": configs, "summary": {label: summarize(recs) for label, recs in named},
           "runs": {name: str(folder) for name, _, folder in results}}
    atomic_write_bytes(out / "compare.json",
                       json.dumps(_jsonable(doc), indent=1, allow_nan=False).encode() + b"\n")
    plot_runs(named, out / "compare.png", title=head.split(";")[0])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
