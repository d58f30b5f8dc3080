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

import datetime as _dt
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import machine_lines, report_main, skipped_lines  # noqa: E402  (shared)

SUITE = BENCH_DIR / "test_bench_train_step.py"
RESULTS_DIR = BENCH_DIR / "results"
VARIANTS = ("float", "oqfl", "torch_ao", "eager_lsq")
DEFAULT_MIN_ROUNDS = 10
DEFAULT_MAX_TIME = 3.0


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
    out += skipped_lines(data)
    return "\n".join(out) + "\n"


def _default_stem(data: dict) -> str:
    dev = "cuda" if data.get("machine_info", {}).get("cuda_available") else "cpu"
    return f"train_step-{dev}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def main(argv=None) -> int:
    return report_main(argv, doc=__doc__, suite=SUITE, render=render,
                       default_stem=_default_stem, min_rounds=DEFAULT_MIN_ROUNDS,
                       max_time=DEFAULT_MAX_TIME, keyword='test_train_step')


if __name__ == "__main__":
    sys.exit(main())
