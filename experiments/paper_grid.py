"""The paper's claim on real data: OQFL at 8/4/3/2 bits against FP32 FedAvg, across CNNs.

Runs the grid of docs/RESULTS.md (networks x data splits x arms) with the ``oqfl-fl`` command,
one run per folder ``OUT/<network>-<split>/<arm>``, and makes the tables and plots from their
``metrics.json`` files::

    python experiments/paper_grid.py run                 # the whole grid, 2 runs at a time
    python experiments/paper_grid.py run --nets resnet20 --splits iid --arms fp32,w4a4
    python experiments/paper_grid.py deploy              # converted integer models vs float
    python experiments/paper_grid.py report              # tables + plots into docs/
    python experiments/paper_grid.py claim               # the claim per network and split

``run`` is resumable: a finished run is skipped, an interrupted one continues from its last
checkpoint (``oqfl-fl --resume``), bit-identically, so the grid can be completed over several
sittings. Every run gets the same seed, data, partition, rounds, local epochs and learning rates;
only the quantization (and the uplink codec that goes with it) differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "paper"

# network -> its oqfl-fl options (widths chosen so one run fits the time budget on 2 cores)
NETS: Dict[str, List[str]] = {
    "small_cnn": ["--model", "small_cnn", "--width", "32"],
    "vgg": ["--model", "vgg", "--width", "16"],
    "resnet20": ["--model", "resnet20"],
    "mobilenet_v2": ["--model", "mobilenet_v2"],
    # the full-scale runs (issue 17): 28x28 images and all 60000 training images
    "small_cnn_full": ["--model", "small_cnn", "--width", "32"],
    "resnet20_full": ["--model", "resnet20"],
}
# options that replace COMMON's for a network (they come after it on the command line)
NET_OVERRIDES: Dict[str, List[str]] = {
    net: ["--image-size", "28", "--train-subset", "all"] for net in NETS if net.endswith("_full")}
SPLITS: Dict[str, List[str]] = {
    "iid": ["--partition", "iid"],
    "dirichlet": ["--partition", "dirichlet", "--alpha", "0.5"],
    "dirichlet0.1": ["--partition", "dirichlet", "--alpha", "0.1"],
}
# arm -> (label, options): the uplink codec follows the weight bits (8 -> int8, else int4)
ARMS: Dict[str, tuple] = {
    "fp32": ("FP32 FedAvg", ["--weight-bits", "float", "--act-bits", "float",
                             "--uplink", "float32"]),
    "w8a8": ("OQFL W8A8", ["--weight-bits", "8", "--act-bits", "8", "--uplink", "int8"]),
    "w4a4": ("OQFL W4A4", ["--weight-bits", "4", "--act-bits", "4", "--uplink", "int4"]),
    "w3a3": ("OQFL W3A3", ["--weight-bits", "3", "--act-bits", "3", "--uplink", "int4"]),
    "w2a2": ("OQFL W2A2", ["--weight-bits", "2", "--act-bits", "2", "--uplink", "int4"]),
    "w4af": ("OQFL W4 float act", ["--weight-bits", "4", "--act-bits", "float",
                                   "--uplink", "int4"]),
}
# what was tried where W4A4 falls short of FP32: one knob of the quantizers changed at a time,
# and two diagnostics that separate the quantized model from the quantized update
_W4A4 = ARMS["w4a4"][1]
TRIALS: Dict[str, tuple] = {
    # the quantizer defaults before they were chosen on a validation split (docs/RESULTS.md)
    "w4a4-init-mse": ("W4A4, MSE step-size init", _W4A4 + ["--quant-init", "mse"]),
    "w4a4-no-grad-scale": ("W4A4, no step-size gradient scale", _W4A4 + ["--grad-scale", "none"]),
    "w4a4-step-lr-x1": ("W4A4, step-size lr x1", _W4A4 + ["--step-size-lr-scale", "1"]),
    "w4a4-step-lr-x10": ("W4A4, step-size lr x10", _W4A4 + ["--step-size-lr-scale", "10"]),
    "w4a4-first-last-float": ("W4A4, first/last layer float", _W4A4 + ["--first-last-bits",
                                                                        "float"]),
    "w4a4-first-last-4": ("W4A4, first/last layer 4-bit too", _W4A4 + ["--first-last-bits", "4"]),
    "w4a4-uplink-f32": ("W4A4 model, float32 uplink", ["--weight-bits", "4", "--act-bits", "4",
                                                        "--uplink", "float32"]),
    "fp32-uplink-int4": ("FP32 model, int4 uplink", ["--weight-bits", "float", "--act-bits",
                                                     "float", "--uplink", "int4"]),
    # the compressed downlink (issue 16's total-traffic check): against w4a4's float32 downlink
    "w4a4-down-int4-delta": ("W4A4, int4-delta downlink", _W4A4 + ["--downlink", "int4-delta"]),
}
ALL_ARMS = {**ARMS, **TRIALS}
DEFAULT_NETS = ("small_cnn", "vgg", "resnet20")
# shared by every run: the federation, the local training and the data; the quantizers'
# options are the package's defaults (oqfl_ext.nn.QUANT_DEFAULTS)
COMMON = ["--dataset", "fashion-mnist", "--image-size", "14", "--train-subset", "20000",
          "--test-subset", "all", "--clients", "10", "--fraction", "0.5",
          "--local-epochs", "1", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9",
          "--no-eval-integer",
          "--threads", "1",
          "--quiet"]
DEFAULT_ROUNDS = 20
# the slowest network first, so the last runs to finish are short ones
_COST_ORDER = ("resnet20_full", "small_cnn_full", "mobilenet_v2", "resnet20", "small_cnn", "vgg")


def _cost_rank(net: str) -> int:
    return _COST_ORDER.index(net) if net in _COST_ORDER else len(_COST_ORDER)


def _csv(choices: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what}: expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers >= 0, "
                                         f"got {text!r}")
    return seeds


def run_dir(out: Path, net: str, split: str, arm: str, seed: int = 0) -> Path:
    """``OUT/<net>-<split>/<arm>`` for the grid's seed 0, ``<arm>-seed<N>`` for repeats."""
    return out / f"{net}-{split}" / (arm if seed == 0 else f"{arm}-seed{seed}")


def command(out: Path, net: str, split: str, arm: str, rounds: int, seed: int = 0) -> List[str]:
    """The oqfl-fl command line of one run (always --resume: it also starts a new run)."""
    return (["oqfl-fl"] + NETS[net] + SPLITS[split] + COMMON + NET_OVERRIDES.get(net, [])
            + ALL_ARMS[arm][1]
            + ["--seed", str(seed), "--rounds", str(rounds),
               "--out", str(run_dir(out, net, split, arm, seed)), "--resume"])


def rounds_done(folder: Path) -> int:
    """Rounds of a finished run (0 while it runs or when it was never started): oqfl-fl
    rewrites metrics.json every round and writes model.safetensors once, at the end."""
    from oqfl_ext.fl.metrics import load_run
    model, metrics = folder / "model.safetensors", folder / "metrics.json"
    if not model.is_file() or not metrics.is_file() or \
            model.stat().st_mtime_ns < metrics.stat().st_mtime_ns:
        return 0
    return len(load_run(folder)[1])


def finished(folder: Path, rounds: int) -> bool:
    return rounds_done(folder) >= rounds


def config_mismatch(folder: Path, job) -> Optional[str]:
    """Why the finished run in ``folder`` is not the run ``command(*job)`` asks for (another
    version of the grid's options), or None."""
    from oqfl_ext.fl.checkpoint import CheckpointMismatch, compare_configs
    from oqfl_ext.fl.cli import build_config, build_parser
    from oqfl_ext.fl.metrics import load_run
    want = build_config(build_parser().parse_args(command(*job)[1:]))
    try:
        compare_configs(load_run(folder)[0], want)
    except CheckpointMismatch as e:
        return str(e)
    return None


def _source_version() -> str:
    """The commit the runs' code comes from, and whether the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty.strip() else "")


def log_path(folder: Path) -> Path:
    """A run's log, beside its folder: oqfl-fl starts a new run only in an empty folder."""
    return folder.with_name(folder.name + ".log")


def _run_one(job) -> tuple:
    folder = run_dir(*job[:4], seed=job[5])
    folder.parent.mkdir(parents=True, exist_ok=True)
    argv = command(*job)
    cmd = [sys.executable, "-m", "oqfl_ext.fl"] + argv[1:]
    t0 = time.perf_counter()
    with open(log_path(folder), "ab") as log:
        log.write(f"# source: {_source_version()}\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    return folder, rc, time.perf_counter() - t0


def cmd_run(args) -> int:
    jobs, stale = [], []
    for seed in args.seeds:
        for net in sorted(args.nets, key=_cost_rank):
            for split in args.splits:
                for arm in args.arms:
                    job = (args.out, net, split, arm, args.rounds, seed)
                    folder = run_dir(args.out, net, split, arm, seed)
                    done = rounds_done(folder)
                    if done >= args.rounds:
                        why = config_mismatch(folder, job)
                        if why:
                            stale.append(f"{folder}: {why}")
                        print(f"{'STALE' if why else 'done':9s} "
                              f"{folder.relative_to(args.out)} ({done} rounds)")
                    else:
                        jobs.append(job)
    if stale:
        print("these finished runs were made with other options than the grid's now; move "
              "them away (or choose another --out) and run again:\n  " + "\n  ".join(stale),
              file=sys.stderr)
        return 1
    if args.dry_run:
        for job in jobs:
            print(shlex.join(command(*job)))
        return 0
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(_run_one, job) for job in jobs]):
            folder, rc, secs = future.result()
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {log_path(folder)})"
            print(f"{status:9s} {folder.relative_to(args.out)} in {secs:.0f} s", flush=True)
            failed += rc != 0
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# report: tables and plots from the runs' metrics.json

def _load_model(folder: Path):
    """The final global model of a finished run, rebuilt from its metrics.json config and its
    model.safetensors (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load

    from oqfl_ext.fl.experiment import ExperimentConfig, model_fn
    from oqfl_ext.fl.metrics import load_run
    cfg, _ = load_run(folder)
    model = model_fn(ExperimentConfig.from_record(cfg), 1, 10, cfg["image_size"])()
    model.load_state_dict(load((folder / "model.safetensors").read_bytes()))
    return cfg, model.eval()


def _cost(folder: Path):
    from oqfl_ext.nn.bitops import cost
    cfg, model = _load_model(folder)
    return cost(model, (1, cfg["image_size"], cfg["image_size"]))


# the accuracy of one round moves by about half a point from round to round: the mean of the
# last rounds is a steadier summary than the final round alone
TAIL = 3


def _tail_mean(records) -> float:
    accs = [float(r["accuracy"]) for r in records[-TAIL:]]
    return sum(accs) / len(accs)


def _mb(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _ptq_accuracy(base_dir: Path, quant_record: dict) -> float:
    """Test accuracy of the FP32 run's final model quantized after training as the quantized
    run ``quant_record`` quantizes (step sizes calibrated on the server's calibration images,
    no retraining): the baseline OQFL has to beat (issue 17)."""
    import oqfl_ext.fl.experiment as ex
    from oqfl_ext.fl.server import evaluate_model
    _, fp32_model = _load_model(base_dir)
    cfg = ex.ExperimentConfig.from_record(quant_record)
    data = ex.load_data(cfg)
    ptq = ex.post_training_baseline(cfg, fp32_model, data, ex.make_partitions(cfg, data.train_y))
    return evaluate_model(ptq, data.test_x, data.test_y)[0]


# columns after the arm's name: one "—" per column for a row without that number
_COLUMNS = ("uplink", "final acc %", "best acc %", f"last {TAIL} rounds %",
            f"gap to FP32 (final / best / last {TAIL}), pts", "uplink MB total", "uplink vs FP32",
            "downlink MB total", "total MB (up + down)", "total vs FP32", "model bytes (vs FP32)",
            "BitOPs vs FP32")


def grid_table(out: Path, net: str, split: str, arms: Sequence[str], rounds: int):
    """Markdown rows of one network and split, the named runs and the totals for the plot;
    ``None`` when its FP32 run is missing. Below the arms: the FP32 model quantized after
    training (PTQ) at the W4A4 arm's bits, when that arm has finished."""
    from oqfl_ext.fl.metrics import load_run, summarize
    base_dir = run_dir(out, net, split, "fp32")
    if not finished(base_dir, rounds):
        return None
    base_records = load_run(base_dir)[1]
    base = summarize(base_records)
    base_tail = _tail_mean(base_records)
    base_cost = _cost(base_dir)
    rows, named, seconds = [], [], 0.0
    for arm in arms:
        folder = run_dir(out, net, split, arm)
        if not finished(folder, rounds):
            rows.append(f"| {ARMS[arm][0]} | (not finished: {rounds_done(folder)} of {rounds} "
                        "rounds) |" + " |" * (len(_COLUMNS) - 1))
            continue
        cfg, records = load_run(folder)
        s = summarize(records)
        c = _cost(folder)
        seconds += s["total_time_s"]
        gap = 100 * (s["final_accuracy"] - base["final_accuracy"])
        gap_best = 100 * (s["best_accuracy"] - base["best_accuracy"])
        tail = _tail_mean(records)
        rows.append(
            f"| {ARMS[arm][0]} | {cfg['uplink']} | {100 * s['final_accuracy']:.2f} "
            f"| {100 * s['best_accuracy']:.2f} | {100 * tail:.2f} "
            f"| {gap:+.2f} / {gap_best:+.2f} / {100 * (tail - base_tail):+.2f} "
            f"| {_mb(s['uplink_mb'])} | {base['uplink_mb'] / s['uplink_mb']:.2f}x "
            f"| {_mb(s['downlink_mb'])} | {_mb(s['total_mb'])} "
            f"| {base['total_mb'] / s['total_mb']:.2f}x "
            f"| {c.param_bytes / 1e3:.1f} kB ({base_cost.param_bytes / c.param_bytes:.2f}x) "
            f"| {c.bitops / base_cost.bitops:.4f} |")
        named.append((ARMS[arm][0], records))
    w4a4 = run_dir(out, net, split, "w4a4")
    if "w4a4" in arms and finished(w4a4, rounds):
        acc = _ptq_accuracy(base_dir, load_run(w4a4)[0])
        gap = 100 * (acc - base["final_accuracy"])
        rows.append(f"| FP32 FedAvg + PTQ W4A4 (no retraining) | — | {100 * acc:.2f} | — | — "
                    f"| {gap:+.2f} / — / — |" + " — |" * (len(_COLUMNS) - 5))
    head = ("| arm | " + " | ".join(_COLUMNS) + " |\n|---|---|"
            + "---:|" * (len(_COLUMNS) - 1))
    return head + "\n" + "\n".join(rows), named, seconds


def _seeds_run(out: Path, net: str, split: str, arm: str, rounds: int) -> List[int]:
    """The seeds for which both ``arm`` and FP32 finished."""
    import re
    found = {0} | {int(m.group(1)) for p in (out / f"{net}-{split}").glob(f"{arm}-seed*")
                   if (m := re.fullmatch(re.escape(arm) + r"-seed(\d+)", p.name))}
    return sorted(s for s in found if finished(run_dir(out, net, split, arm, s), rounds)
                  and finished(run_dir(out, net, split, "fp32", s), rounds))


def _gaps(out: Path, net: str, split: str, arm: str, seed: int):
    """(arm final, FP32 final, final gap, last-rounds gap) in points, same seed."""
    from oqfl_ext.fl.metrics import load_run
    a = load_run(run_dir(out, net, split, arm, seed))[1]
    b = load_run(run_dir(out, net, split, "fp32", seed))[1]
    fa, fb = 100 * float(a[-1]["accuracy"]), 100 * float(b[-1]["accuracy"])
    return fa, fb, fa - fb, 100 * (_tail_mean(a) - _tail_mean(b))


def seed_table(out: Path, nets: Sequence[str], splits: Sequence[str], rounds: int) -> str:
    """Every arm repeated with other seeds against FP32 with the same seed (same initial model,
    partition and client sampling): final accuracies per seed, mean and range of the gaps."""
    import statistics
    rows = []
    for net in nets:
        for split in splits:
            for arm in ARMS:
                seeds = _seeds_run(out, net, split, arm, rounds) if arm != "fp32" else []
                if len(seeds) < 2:
                    continue
                got = [_gaps(out, net, split, arm, seed) for seed in seeds]
                finals = "; ".join(f"{fb:.2f} / {fa:.2f}" for fa, fb, _, _ in got)
                final_gaps, tail_gaps = [g[2] for g in got], [g[3] for g in got]
                rows.append(f"| {net} | {split} | {ARMS[arm][0]} | {len(seeds)} | {finals} "
                            f"| {statistics.mean(final_gaps):+.2f} "
                            f"({min(final_gaps):+.2f} .. {max(final_gaps):+.2f}) "
                            f"| {statistics.mean(tail_gaps):+.2f} "
                            f"({min(tail_gaps):+.2f} .. {max(tail_gaps):+.2f}) |")
    if not rows:
        return "(no repeated seeds yet)"
    return (f"| network | split | arm | seeds | final acc % FP32 / arm, per seed "
            f"| final gap, pts: mean (range) | last {TAIL} rounds gap, pts: mean (range) |\n"
            "|---|---|---|---:|---|---:|---:|\n" + "\n".join(rows))


def trial_table(out: Path, nets: Sequence[str], splits: Sequence[str], rounds: int) -> str:
    """The finished trial arms (:data:`TRIALS`) next to the arm they change, each against FP32
    with the same seed."""
    rows = []
    for net in nets:
        for split in splits:
            for arm, label in [("w4a4", "W4A4 (the grid's)")] + [(k, v[0]) for k, v in
                                                                  TRIALS.items()]:
                for seed in _seeds_run(out, net, split, arm, rounds):
                    if arm == "w4a4" and not any(
                            finished(run_dir(out, net, split, t, seed), rounds) for t in TRIALS):
                        continue
                    fa, fb, gap, tail_gap = _gaps(out, net, split, arm, seed)
                    rows.append(f"| {net} | {split} | {label} | {seed} | {fb:.2f} | {fa:.2f} "
                                f"| {gap:+.2f} | {tail_gap:+.2f} |")
    if not rows:
        return "(no trial run yet)"
    return (f"| network | split | run | seed | FP32 final acc % | final acc % | gap, pts "
            f"| last {TAIL} rounds gap, pts |\n|---|---|---|---:|---:|---:|---:|---:|\n"
            + "\n".join(rows))


# issue 17's goal per network and split: W4A4 within this of FP32 (mean over 3 seeds of the
# last-rounds gap)
CLAIM_GAP_PTS = 0.5


def _spread(values: Sequence[float]) -> str:
    import statistics
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ({min(values):+.2f} .. {max(values):+.2f})"


def claim_table(out: Path, nets: Sequence[str], splits: Sequence[str], rounds: int):
    """One row per network and split with FP32 and W4A4 finished on at least one seed: the
    last-rounds gaps of W4A4 (every seed run), W8A8 / W3A3 / W2A2 (seed 0) to FP32 of the same
    seed, the PTQ baseline per W4A4 seed, the traffic ratios; and the goal met or not.
    Returns (markdown, the run folders it read)."""
    import statistics

    from oqfl_ext.fl.metrics import load_run, summarize
    rows, folders = [], []
    for net in nets:
        for split in splits:
            seeds = _seeds_run(out, net, split, "w4a4", rounds)
            if not seeds:
                continue
            fp32_tail, w4_tail, gaps, ptq_over, up, down, total = [], [], [], [], [], [], []
            for s in seeds:
                base, quant = (run_dir(out, net, split, arm, s) for arm in ("fp32", "w4a4"))
                (_, b), (cfg, a) = load_run(base), load_run(quant)
                fp32_tail.append(100 * _tail_mean(b))
                w4_tail.append(100 * _tail_mean(a))
                gaps.append(w4_tail[-1] - fp32_tail[-1])
                ptq_over.append(100 * (float(a[-1]["accuracy"]) - _ptq_accuracy(base, cfg)))
                sa, sb = summarize(a), summarize(b)
                up.append(sb["uplink_mb"] / sa["uplink_mb"])
                down.append(sb["downlink_mb"] / sa["downlink_mb"])
                total.append(sb["total_mb"] / sa["total_mb"])
                folders += [quant, base]
            lower = []
            for arm in ("w8a8", "w3a3", "w2a2"):
                if 0 in _seeds_run(out, net, split, arm, rounds):
                    lower.append(_spread([_gaps(out, net, split, arm, 0)[3]]))
                    folders.append(run_dir(out, net, split, arm))
                else:
                    lower.append("—")
            mean_gap = statistics.mean(gaps)
            # the goal is a mean over 3 seeds: with fewer it is only a first reading
            met = ("met" if mean_gap >= -CLAIM_GAP_PTS else "not met") + (
                "" if len(seeds) >= 3 else f" ({len(seeds)} of 3 seeds)")
            rows.append(
                f"| {net} | {split} | {len(seeds)} | {statistics.mean(fp32_tail):.2f} "
                f"| {statistics.mean(w4_tail):.2f} | {_spread(gaps)} | {met} "
                f"| {_spread(ptq_over)} | {lower[0]} | {lower[1]} | {lower[2]} "
                f"| {statistics.mean(up):.2f}x / {statistics.mean(down):.2f}x "
                f"/ {statistics.mean(total):.2f}x |")
    if not rows:
        return "(no network and split has finished FP32 and W4A4 runs yet)", folders
    head = (f"| network | split | seeds | FP32, last {TAIL} rounds % | W4A4, last {TAIL} rounds % "
            f"| W4A4 - FP32, pts: mean (range) | within {CLAIM_GAP_PTS} pts "
            f"| W4A4 - PTQ W4A4 (final), pts | W8A8 - FP32 | W3A3 - FP32 | W2A2 - FP32 "
            f"| W4A4 traffic vs FP32: uplink / downlink / total |\n|---|---|---:|---:|---:|---:|---|---:|---:"
            f"|---:|---:|---:|")
    return head + "\n" + "\n".join(rows), folders


def _claim_rows(table: str) -> Dict[tuple, str]:
    """The rows of a claim table keyed by (network, split); header and separator skipped."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] in NETS and cells[1] in SPLITS:
            rows[(cells[0], cells[1])] = line
    return rows


def merge_claim_tables(old: str, new: str) -> str:
    """``new`` plus the rows of ``old`` for every network and split ``new`` has no row for, in
    the grid's order: the grid's run folders live on one machine, so a pair run in another
    session (its folders gone) keeps the row computed there instead of vanishing."""
    new_rows = _claim_rows(new)
    if not new_rows:
        return old if _claim_rows(old) else new
    rows = {**_claim_rows(old), **new_rows}
    head = "\n".join(new.splitlines()[:2])
    order = {key: i for i, key in enumerate((n, s) for n in NETS for s in SPLITS)}
    return head + "\n" + "\n".join(rows[k] for k in sorted(rows, key=order.__getitem__))


def _marker_text(path: Path, marker: str) -> str:
    doc = path.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in doc or end not in doc:
        return ""
    return doc.split(begin, 1)[1].split(end, 1)[0]


def cmd_claim(args) -> int:
    """The claim table into RESULTS.md (marker ``claim``; rows of pairs not found under --out
    are kept) and the per-round metrics of the runs it read into
    ``docs/results/metrics/<--metrics-dir>/``."""
    table, folders = claim_table(args.out, args.nets, args.splits, args.rounds)
    table = merge_claim_tables(_marker_text(args.docs / "RESULTS.md", "claim"), table)
    dst_dir = args.docs / "results" / "metrics" / args.metrics_dir
    for folder in folders:
        dst = dst_dir / f"{folder.parent.name}-{folder.name}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((folder / "metrics.json").read_bytes())
    _splice(args.docs / "RESULTS.md", {"claim": table})
    print(table)
    return 0


def cmd_report(args) -> int:
    from oqfl_ext.fl.metrics import plot_runs
    docs = args.docs
    sections, total_s = [], 0.0
    for net in args.nets:
        for split in args.splits:
            got = grid_table(args.out, net, split, args.arms, args.rounds)
            if got is None:
                print(f"skipped {net}-{split}: no finished FP32 run in {args.out}")
                continue
            table, named, seconds = got
            total_s += seconds
            # the per-round numbers of every finished run (grid, trials, seeds), kept with docs
            for folder in sorted((args.out / f"{net}-{split}").iterdir()):
                if finished(folder, args.rounds):
                    dst = docs / "results" / "metrics" / f"{net}-{split}-{folder.name}.json"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes((folder / "metrics.json").read_bytes())
            png = docs / "results" / f"{net}-{split}.png"
            title = f"{net} on Fashion-MNIST, {split}"
            plot_runs(named, png, title=title)
            sections.append(f"### {title}\n\n{table}\n\n![{title}](results/{png.name})\n\n"
                            f"Training time of these runs: {seconds / 60:.1f} min (sum of the "
                            f"rounds' wall time, one thread per run).\n")
    # (RESULTS' uplink table, "Where the uplink bytes go", comes from real updates measured by
    # bench/codec_real_updates.py --results-md, not from these runs)
    _splice(docs / "RESULTS.md", {
        "grid": "\n".join(sections) + f"\nAll runs: {total_s / 3600:.2f} h of one-thread time.",
        "seeds": seed_table(args.out, args.nets, args.splits, args.rounds),
        "trials": trial_table(args.out, args.nets, args.splits, args.rounds)})
    print(f"wrote {len(sections)} tables and plots into {docs}")
    return 0


def _splice(path: Path, sections: Dict[str, str]) -> None:
    """For each ``marker: text``, replaces what lies between ``<!-- marker:begin -->`` and
    ``<!-- marker:end -->`` in ``path`` (the rest of the document is hand-written); all or
    nothing: the file is written once, after every marker was found."""
    from oqfl_ext._io import atomic_write_bytes
    doc = path.read_text()
    for marker, text in sections.items():
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
            raise SystemExit(f"{path}: expected the markers {begin} and then {end}, once each")
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = head + begin + "\n" + text.strip() + "\n" + end + tail
    atomic_write_bytes(path, doc.encode())


# ----------------------------------------------------------------------------------------------
# deploy: the converted integer models against the float model on this CPU

def _accuracy(model, x, y, batch: int = 1000) -> float:
    import torch
    correct = 0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            correct += int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return correct / len(y)


def _median_ms(model, x, repeats: int) -> float:
    import statistics

    import torch
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cmd_deploy(args) -> int:
    import tempfile
    import warnings

    import torch

    from oqfl_ext.fl.experiment import ExperimentConfig, load_data
    from oqfl_ext.nn.integer import ConversionWarning, convert, save_packed
    torch.set_num_threads(args.threads)
    rows = []
    for net in args.nets:
        for split in args.splits:
            folders = {arm: run_dir(args.out, net, split, arm) for arm in ("fp32", "w8a8", "w4a4")}
            if not all(finished(f, args.rounds) for f in folders.values()):
                print(f"skipped {net}-{split}: the FP32, W8A8 and W4A4 runs are not all finished")
                continue
            cfg, fp32 = _load_model(folders["fp32"])
            data = load_data(ExperimentConfig.from_record(cfg))
            vx, vy = data.test_x, data.test_y
            cl = torch.channels_last
            one, batch = vx[:1].contiguous(memory_format=cl), vx[:args.batch].contiguous(
                memory_format=cl)
            # the float model at its faster memory format (the integer ops run channels_last)
            ref = {b: min(_median_ms(fp32.to(memory_format=fmt), x.contiguous(memory_format=fmt),
                                     args.repeats)
                          for fmt in (torch.contiguous_format, cl))
                   for b, x in ((1, one), (args.batch, batch))}
            fp32_bytes = sum(t.numel() * t.element_size() for t in fp32.state_dict().values())
            rows.append(f"| {net} | {split} | FP32 float | {100 * _accuracy(fp32, vx, vy):.2f} | - "
                        f"| {ref[1]:.3f} | {ref[args.batch]:.2f} | 1.00x / 1.00x "
                        f"| {fp32_bytes / 1e3:.1f} kB |")
            for arm in ("w8a8", "w4a4"):
                _, fake = _load_model(folders[arm])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConversionWarning)
                    integer = convert(fake).to(memory_format=torch.channels_last)
                fake_acc, int_acc = _accuracy(fake, vx, vy), _accuracy(integer, vx, vy)
                with torch.no_grad():
                    agree = float((fake(vx).argmax(1) == integer(vx).argmax(1)).float().mean())
                ms = {b: _median_ms(integer, x, args.repeats) for b, x in ((1, one), (args.batch, batch))}
                with tempfile.TemporaryDirectory() as tmp:
                    save_packed(integer, Path(tmp) / "m.safetensors")
                    size = (Path(tmp) / "m.safetensors").stat().st_size
                rows.append(
                    f"| {net} | {split} | {ARMS[arm][0]} integer | {100 * int_acc:.2f} "
                    f"| {100 * fake_acc:.2f} ({100 * agree:.2f} % same class) "
                    f"| {ms[1]:.3f} | {ms[args.batch]:.2f} "
                    f"| {ref[1] / ms[1]:.2f}x / {ref[args.batch] / ms[args.batch]:.2f}x "
                    f"| {size / 1e3:.1f} kB ({fp32_bytes / size:.2f}x smaller) |")
            print("\n".join(rows[-3:]), flush=True)
    head = (f"{torch.get_num_threads()} threads, float32 input (channels_last for the integer "
            f"models, the faster of NCHW and channels_last for the float model); medians of "
            f"{args.repeats} calls after 3 warm-up calls.\n\n"
            f"| network | split | model | test acc % | fake-quant acc % | ms batch 1 "
            f"| ms batch {args.batch} | speed vs float (1 / {args.batch}) "
            f"| bytes (float: state; integer: save_packed file) |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|")
    _splice(args.docs / "RESULTS.md", {"deploy": head + "\n" + "\n".join(rows)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from oqfl_ext.fl.experiment import parse_positive_int as _positive
    p = argparse.ArgumentParser(prog="paper_grid.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--out", type=Path, default=DEFAULT_OUT, help="grid folder (default: "
                        "runs/paper)")
        sp.add_argument("--nets", type=_csv(tuple(NETS), "--nets"), default=list(DEFAULT_NETS))
        sp.add_argument("--splits", type=_csv(tuple(SPLITS), "--splits"), default=list(SPLITS))
        sp.add_argument("--arms", type=_csv(tuple(ALL_ARMS), "--arms"), default=list(ARMS),
                        help=f"comma-separated, default: the grid's {', '.join(ARMS)}; "
                             f"trials: {', '.join(TRIALS)}")
        sp.add_argument("--rounds", type=_positive, default=DEFAULT_ROUNDS)

    r = sub.add_parser("run", help="run (or continue) the grid's runs")
    common(r)
    r.add_argument("--jobs", type=_positive, default=2, help="runs at once, one thread each "
                   "(default: 2, one per core of the reference machine)")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    r.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default: "
                   "0, the grid; others repeat runs to measure seed-to-seed spread)")

    rep = sub.add_parser("report", help="tables and plots of the finished runs into "
                         "docs/RESULTS.md and docs/results/")
    common(rep)
    rep.add_argument("--docs", type=Path, default=ROOT / "docs")

    c = sub.add_parser("claim", help="issue 17's goals per network and split (W4A4 vs FP32 over "
                       "the seeds run, PTQ baseline, lower bits, traffic) into docs/RESULTS.md")
    common(c)
    c.add_argument("--docs", type=Path, default=ROOT / "docs")
    c.add_argument("--metrics-dir", default="rerun-2026-12-04", help="folder under "
                   "docs/results/metrics/ for the runs' per-round metrics")

    d = sub.add_parser("deploy", help="converted W8A8/W4A4 integer models against the FP32 "
                       "float model: accuracy, file size, CPU inference time")
    common(d)
    d.add_argument("--docs", type=Path, default=ROOT / "docs")
    d.add_argument("--threads", type=_positive, default=2)
    d.add_argument("--batch", type=_positive, default=256)
    d.add_argument("--repeats", type=_positive, default=30)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.resolve()
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "deploy":
        return cmd_deploy(args)
    if args.cmd == "claim":
        return cmd_claim(args)
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
