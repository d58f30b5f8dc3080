#!/usr/bin/env python
"""Run the ResNet-20 training-step benchmark and print a markdown table.

    python bench/report_train_step.py                 # run (~1 min on 2 cores), print the table
    python bench/report_train_step.py --save          # ... and write bench/results/<name>.md/.json
    python bench/report_train_step.py results.json    # table from an existing pytest-benchmark JSON

One row per variant and device: median step time, its ratio to the float step, and the
quantization overhead (variant median minus float median) with its ratio to oqfl's overhead.
Targets (README): oqfl <= 1.35x float, and oqfl >= 2x faster than torch_ao.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import machine_lines, publish, suite_results  # noqa: E402  (shared with the op report)

ROOT = BENCH_DIR.parent
SUITE = BENCH_DIR / "test_bench_train_step.py"
RESULTS_DIR = BENCH_DIR / "results"
VARIANTS = ("float", "oqfl", "torch_ao", "eager_lsq")
DEFAULT_MIN_ROUNDS = 10
DEFAULT_MAX_TIME = 3.0


def run_suite(json_path: Path, min_rounds: int, max_time: float) -> int:
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-q", "-rs", "-p", "no:cacheprovider",
           "-k", "test_train_step",
           f"--benchmark-json={json_path}", f"--benchmark-min-rounds={min_rounds}",
           f"--benchmark-max-time={max_time}", "--benchmark-warmup=on",
           "--benchmark-warmup-iterations=2", "--benchmark-disable-gc",
           "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=ROOT, stdout=sys.stderr)


def render(data: dict) -> str:
    groups: dict = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups.setdefault(b.get("group") or "?", {})[info.get("variant")] = b["stats"]
    out = ["## ResNet-20 training step (batch 128, 3x32x32, SGD momentum)", ""]
    out += machine_lines(data)
    out += ["", "Median step time (forward, backward, optimizer step); `x float` = median / float "
            "median; `overhead` = median - float median; `x oqfl overhead` = that over oqfl's.",
            "", "| device | variant | median ms | min ms | rounds | x float | overhead ms "
            "| x oqfl overhead |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for group in sorted(groups):
        stats = groups[group]
        device = group.rsplit("-", 1)[-1]
        base = stats.get("float", {}).get("median")
        ours = stats.get("oqfl", {}).get("median")
        for v in VARIANTS:
            s = stats.get(v)
            if s is None:
                continue
            med = s["median"]
            ratio = f"{med / base:.2f}" if base else "—"
            over = med - base if base else None
            ours_over = ours - base if (base and ours) else None
            rel = f"{over / ours_over:.2f}" if over is not None and ours_over else "—"
            out.append(f"| {device} | {v} | {med * 1e3:.1f} | {s['min'] * 1e3:.1f} "
                       f"| {s['rounds']} | {ratio} | "
                       f"{'—' if over is None else f'{over * 1e3:.1f}'} | {rel} |")
        ao = stats.get("torch_ao", {}).get("median")
        if base and ours:
            verdicts.append(f"- {device}: oqfl / float = {ours / base:.2f} (target <= 1.35: "
                            f"{'met' if ours / base <= 1.35 else 'NOT met'})")
        if ao and ours:
            verdicts.append(f"- {device}: torch_ao / oqfl = {ao / ours:.2f} (target >= 2: "
                            f"{'met' if ao / ours >= 2 else 'NOT met'}); on the quantization "
                            f"overhead alone: {(ao - base) / (ours - base):.2f}"
                            if base and ours > base else
                            f"- {device}: torch_ao / oqfl = {ao / ours:.2f}")
    if verdicts:
        out += ["", "Targets:"] + verdicts
    skipped = data.get("skipped") or []
    reasons: dict = {}
    for s in skipped:
        reasons.setdefault(s.get("reason", ""), []).append(s.get("nodeid", ""))
    if reasons:
        out += ["", "Skipped:"] + [f"- {len(ids)} x {r}" for r, ids in reasons.items()]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", help="existing pytest-benchmark JSON to summarize")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="NAME",
                   help="also write bench/results/NAME.md and NAME.json")
    p.add_argument("--min-rounds", type=int, default=DEFAULT_MIN_ROUNDS)
    p.add_argument("--max-time", type=float, default=DEFAULT_MAX_TIME)
    args = p.parse_args(argv)

    rc, data, json_path, tmpdir = suite_results(
        args.json, None, "train_step.json",
        lambda path: run_suite(path, args.min_rounds, args.max_time),
        {"min_rounds": args.min_rounds, "max_time": args.max_time})
    if data is None:
        return rc
    dev = "cuda" if data.get("machine_info", {}).get("cuda_available") else "cpu"
    publish(render(data), data, rc, args.save,
            args.save or f"train_step-{dev}-{_dt.datetime.now():%Y%m%d-%H%M%S}", json_path)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
