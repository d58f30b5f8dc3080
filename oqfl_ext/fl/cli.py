"""``oqfl-fl`` (also ``python -m oqfl_ext.fl``): federated training of a float or LSQ-quantized
CNN on simulated clients, with compressed uplink updates, per-round checkpoints and metrics.

One run writes into ``--out`` (default ``runs/<name>-<date>-<time>``):

* ``metrics.json`` -- the configuration and, per round, accuracy, loss, uplink, downlink and
  total bytes, wall time, accepted and dropped clients, and the run's bytes per direction and
  in total (``traffic``; :mod:`oqfl_ext.fl.metrics`); rewritten after every round;
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

The experiment's options, their defaults and checks, and the construction of the run are
:mod:`oqfl_ext.fl.experiment`'s (one :class:`~oqfl_ext.fl.experiment.ExperimentConfig`); this
module adds the run folder, the progress bar, resuming and the comparison. The Python entry
points are :func:`main` (``main([...])`` returns the exit status), :func:`build_config` and
:func:`run_experiment`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._io import atomic_write_bytes, encode_state
from . import experiment as ex
from .experiment import DATASETS, ExperimentConfig, ExperimentError, load_dataset  # noqa: F401

__all__ = ["main", "build_parser", "build_config", "run_experiment", "compare_arms",
           "DATASETS", "load_dataset"]

logger = logging.getLogger("oqfl_ext.fl")


class UsageError(Exception):
    """A problem with the run's folder (an existing run, a file in the way) reported as one
    line."""


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
    groups = ex.add_arguments(p)
    groups["model and data"].add_argument(
        "--data-dir", default=None,
        help="folder holding the data set's files (default: $OQFL_DATA; fashion-mnist also "
             "looks in the Debian package's folder; digits needs none)")
    g = groups["run"]
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<name>-<date>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    g.add_argument("--compare", action="store_true",
                   help="run FP32 FedAvg and OQFL (--weight-bits/--act-bits/--uplink) with the "
                        "same seed and print a table")
    g.add_argument("--threads", type=ex.parse_nonneg_int, default=ex.DEFAULT_THREADS,
                   help="torch CPU threads; 0: torch's default (one per core). The default "
                        "models are too small for intra-op parallelism to pay: on a 2-core "
                        "machine with other work running, 2 threads were 10x slower than 1")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# configuration

def build_config(args: argparse.Namespace, *, weight_bits=..., act_bits=..., uplink=None,
                 name: Optional[str] = None) -> dict:
    """The JSON-able record (:meth:`ExperimentConfig.record`) of one run from parsed
    arguments (overrides for the --compare arms). Keys are the option names with ``_``; bits
    are ints or ``None`` (float)."""
    return _experiment(args, weight_bits=weight_bits, act_bits=act_bits, uplink=uplink,
                       name=name).record()


def _experiment(args: argparse.Namespace, *, weight_bits=..., act_bits=..., uplink=None,
                name: Optional[str] = None) -> ExperimentConfig:
    overrides: Dict[str, Any] = {"name": name}
    if weight_bits is not ...:
        overrides["weight_bits"] = weight_bits
    if act_bits is not ...:
        overrides["act_bits"] = act_bits
    if uplink is not None:
        overrides["uplink"] = uplink
    return ExperimentConfig.from_args(args, **overrides)


def compare_arms(args: argparse.Namespace) -> List[dict]:
    """The two --compare configurations: FP32 FedAvg (float model, float32 uplink) and OQFL
    (the parsed bits and uplink; W4A4 with an int4 uplink by default)."""
    fp32 = build_config(args, weight_bits=None, act_bits=None, uplink="float32", name="fp32")
    oqfl = build_config(args)
    if args.weight_bits is None and args.act_bits is None and args.uplink == "float32":
        raise UsageError("--compare: the OQFL arm would be FP32 too; give --weight-bits/"
                         "--act-bits or a quantized --uplink")
    return [fp32, oqfl]


# ----------------------------------------------------------------------------------------------
# one run

def _save_model(path: Path, model) -> None:
    atomic_write_bytes(path, encode_state(model.state_dict()))


def run_experiment(cfg: Union[ExperimentConfig, dict], out, *, resume: bool = False,
                   progress: bool = True, data_dir: Optional[str] = None,
                   data_cache: Optional[dict] = None,
                   position: int = 0) -> Tuple[List[dict], Any]:
    """Runs (or with ``resume`` continues) the experiment ``cfg`` (an
    :class:`~oqfl_ext.fl.experiment.ExperimentConfig`, or its record from
    :func:`build_config`) in the folder ``out``; writes the files listed in the module
    docstring and returns ``(metrics records, server)``."""
    from tqdm.auto import tqdm

    from ..data import partition_stats
    from .checkpoint import CHECKPOINT_JSON, has_checkpoint
    from .metrics import METRICS_FILE, save_run, write_metrics

    config = cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig.from_record(cfg)
    cfg = config.record()
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
    data, parts, clients, server = ex.build(config, data_dir, data_cache)
    logger.debug("partition:\n%s", partition_stats(data.train_y, parts))
    out.mkdir(parents=True, exist_ok=True)
    rounds_total = cfg["rounds"]
    bar = tqdm(total=rounds_total, desc=cfg["name"], unit="round", disable=not progress,
               position=position, leave=True, dynamic_ncols=True, file=sys.stderr)
    state = {"records": []}

    def on_client(i, m, cid):
        if i < m:
            bar.set_postfix_str(f"round {server.round + 1}: client {i + 1}/{m}", refresh=True)
        else:
            bar.set_postfix_str(f"round {server.round + 1}: aggregating, evaluating",
                                refresh=True)

    def on_round(record, result):
        state["records"].append(record)
        write_metrics(out / METRICS_FILE, cfg, state["records"])
        bar.set_postfix_str(_postfix(state["records"]), refresh=False)
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
                if done:
                    bar.update(min(len(done), rounds_total))
                    bar.set_postfix_str(_postfix(done) + " (resumed)")
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


def _postfix(records: List[dict]) -> str:
    """The progress bar's text after a round: accuracy, MB so far per direction and in all."""
    from .metrics import traffic
    acc = records[-1].get("accuracy")
    acc_s = "n/a" if acc is None or not math.isfinite(acc) else f"{100 * acc:.2f}%"
    t = traffic(records)
    return (f"acc {acc_s}, up {t['uplink_bytes'] / 1e6:.2f} MB, down "
            f"{t['downlink_bytes'] / 1e6:.2f} MB, total {t['total_bytes'] / 1e6:.2f} MB")


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
            f"{s['uplink_mb']:.2f} MB ({s['uplink_mb_per_round']:.3f}/round), downlink "
            f"{s['downlink_mb']:.2f} MB ({s['downlink_mb_per_round']:.3f}/round), total "
            f"{s['total_mb']:.2f} MB ({s['total_mb_per_round']:.3f}/round), "
            f"{s['time_per_round_s']:.1f} s/round -> {out}")


def _check_runtime_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone: --resume's folder, the device on this machine, and
    the configuration as a whole (e.g. an image size the model cannot take)."""
    if args.resume and args.out is None:
        parser.error("argument --resume: needs --out FOLDER, the run to continue")
    try:
        ex.check_device(args.device)
    except ValueError as e:
        parser.error(f"argument --device: {e}")
    try:
        _experiment(args)
    except ex.ConfigError as e:
        parser.error(f"argument {e.option}: {e.detail}")


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
        servers = []
        for pos, cfg in enumerate(configs):
            folder = out / cfg["name"] if args.compare else out
            records, server = run_experiment(cfg, folder, resume=args.resume,
                                             progress=progress, data_dir=args.data_dir,
                                             data_cache=cache)
            servers.append(server)
            results.append((cfg["name"], records, folder))
            print(_summary_line(cfg["name"], records, folder), flush=True)
        if args.compare:
            ptq = _post_training_baseline(configs[-1], servers[0], args.data_dir, cache)
            _write_comparison(out, configs, results, time.perf_counter() - t0, ptq)
    except (UsageError, ExperimentError, CheckpointError) as e:
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


def _post_training_baseline(record: dict, fp32_server, data_dir, cache) -> Optional[dict]:
    """The FP32 arm's final model quantized after training as the OQFL arm quantizes (no
    retraining), evaluated on the same split: the baseline OQFL's training has to beat.
    None when the OQFL arm's model is not quantized."""
    import warnings

    from ..nn import ConversionWarning, convert
    cfg = ExperimentConfig.from_record(record)
    if not cfg.quantized:
        return None
    data = ex.load_data(cfg, data_dir, cache)
    model = ex.post_training_baseline(cfg, fp32_server.model, data,
                                      ex.make_partitions(cfg, data.train_y))
    acc, _ = fp32_server.evaluate_model(model)
    doc = {"accuracy": acc, "integer_accuracy": None}
    if cfg.eval_integer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarning)
            doc["integer_accuracy"] = fp32_server.evaluate_model(convert(model))[0]
    return doc


def _write_comparison(out: Path, configs: List[dict], results, elapsed: float,
                      ptq: Optional[dict] = None) -> None:
    from .metrics import format_table, jsonable, plot_runs, summarize
    runs = [(name, records) for name, records, _ in results]
    labels = {"fp32": "FP32 FedAvg"}
    named = [(labels.get(name, name.upper().replace("OQFL-", "OQFL ")), recs)
             for name, recs in runs]
    table = format_table(named)
    cfg = configs[-1]
    head = (f"{cfg['model']} on {cfg['dataset']}, {cfg['clients']} clients "
            f"({cfg['partition']}), fraction {cfg['fraction']}, {cfg['rounds']} rounds, seed "
            f"{cfg['seed']}; OQFL: W{ex.bits_text(cfg['weight_bits'])}A{ex.bits_text(cfg['act_bits'])}"
            f", {cfg['uplink']} uplink; {elapsed:.0f} s in all")
    text = head + "\n" + table + "\n"
    if ptq is not None:
        integer = "" if ptq["integer_accuracy"] is None else \
            f" (integer model {100 * ptq['integer_accuracy']:.2f}%)"
        text += (f"PTQ baseline (the FP32 FedAvg model quantized to "
                 f"W{ex.bits_text(cfg['weight_bits'])}A{ex.bits_text(cfg['act_bits'])} after "
                 f"training, no retraining): accuracy {100 * ptq['accuracy']:.2f}%{integer}\n")
    print("\n" + text, end="", flush=True)
    atomic_write_bytes(out / "compare.txt", text.encode())
    doc = {"configs": configs, "summary": {label: summarize(recs) for label, recs in named},
           "runs": {name: str(folder) for name, _, folder in results}, "ptq": ptq}
    atomic_write_bytes(out / "compare.json",
                       json.dumps(jsonable(doc), indent=1, allow_nan=False).encode() + b"\n")
    plot_runs(named, out / "compare.png", title=head.split(";")[0])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
