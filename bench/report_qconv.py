#!/usr/bin/env python
"""Run the qconv2d benchmark (ResNet 3x3 layers) and print a markdown table.

    python bench/report_qconv.py                  # run (about 1-2 min on 2 cores), print the table
    python bench/report_qconv.py --save           # ... and write bench/results/qconv.md (+ .json)
    python bench/report_qconv.py --save NAME      # ... as bench/results/NAME.md / NAME.json
    python bench/report_qconv.py results.json     # table from an existing pytest-benchmark JSON
    python bench/report_qconv.py -k "b32"         # a subset (pytest -k expression)

One row per implementation and group (layer, batch): median and min time, GOPS
(2*N*OC*OH*OW*IC*9 / median), and speedups (baseline median / this median, >1 is faster) over
float F.conv2d, torch.ao int8 and our int8; then the weight bytes per format and the targets:
int8 at batch 32 >= 3.5x float and >= 1.0x torch.ao, at batch 1 >= 1.2x torch.ao, int4 >= 0.95x
our int8. Targets are printed, never asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import machine_lines, report_main, skipped_lines  # noqa: E402  (shared)

SUITE = BENCH_DIR / "test_bench_qconv.py"
RESULTS_DIR = BENCH_DIR / "results"
IMPLS = ("float_conv2d", "torch_ao_int8", "oqfl_int8", "oqfl_int4")
DEFAULT_NAME = "qconv"
DEFAULT_MIN_ROUNDS = 10
DEFAULT_MAX_TIME = 2.0
NOISY = 2.0  # median / min above this: the timing was disturbed (another process, the scheduler)
# (description, numerator impl, denominator impl, batches it applies to, threshold):
# ratio = numerator median / denominator median, i.e. how much faster the denominator is.
TARGETS = (
    ("oqfl int8 vs float F.conv2d", "float_conv2d", "oqfl_int8", (32,), 3.5),
    ("oqfl int8 vs torch.ao int8", "torch_ao_int8", "oqfl_int8", (32,), 1.0),
    ("oqfl int8 vs torch.ao int8", "torch_ao_int8", "oqfl_int8", (1,), 1.2),
    ("oqfl int4 vs oqfl int8", "oqfl_int8", "oqfl_int4", (32, 1), 0.95),
)


def _group_key(name: str):
    # conv3x3-<C>ch-<H>x<W>-b<N>: batch 32 first, then the layers in network order
    try:
        _, ch, _, b = name.split("-")
        return (-int(b[1:]), int(ch[:-2]))
    except ValueError:
        return (1, name)


def _ratio(num, den):
    return num / den if (num and den) else None


def _fmt(r, suffix="×"):
    return "—" if r is None else f"{r:.2f}{suffix}"


def collect(data: dict) -> dict:
    """{group: {impl: (stats, extra_info)}}."""
    groups: dict = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups.setdefault(b.get("group") or "?", {})[info.get("impl")] = (b["stats"], info)
    return groups


def render(data: dict) -> str:
    groups = collect(data)
    mi = data.get("machine_info", {})
    out = ["## oqfl::qconv2d vs float F.conv2d and torch.ao int8 (ResNet 3x3, stride 1, pad 1)",
           ""]
    out += machine_lines(data)
    infos = [i for g in groups.values() for _, i in g.values()]
    threads = sorted({i.get("torch_num_threads") for i in infos} - {None})
    engines = sorted({i.get("quantized_engine") for i in infos} - {None})
    packers = sorted({i.get("packer") for i in infos} - {None})
    out.append(f"- this suite: torch threads {threads or '?'}, quantized engine {engines or '?'}"
               + (f", weights packed by {', '.join(packers)}" if packers else ""))
    loads = [i["loadavg"][0] for i in infos if i.get("loadavg")]
    if loads:
        out.append(f"- 1-min load average as each benchmark started: {min(loads)} .. {max(loads)}"
                   + (f"; after the run: {mi['loadavg_at_end'][0]}"
                      if mi.get("loadavg_at_end") else ""))
    out += ["", "float32 channels_last input to float32 output for every implementation. "
            "`GOPS` = 2·N·OC·OH·OW·IC·9 / median; `×float`, `×ao`, `×int8` = that "
            "baseline's median / this median (>1: faster than float F.conv2d, torch.ao int8, "
            "oqfl int8); `load` = 1-min load average as the benchmark started; `med/min` above "
            f"{NOISY} marks a timing disturbed by other work (rerun on an idle machine).", "",
            "| group | impl | median ms | min ms | med/min | rounds | GOPS | ×float | ×ao | ×int8 "
            "| load |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(groups, key=_group_key):
        g = groups[name]
        med = {impl: s["median"] for impl, (s, _) in g.items()}
        for impl in IMPLS:
            if impl not in g:
                continue
            s, info = g[impl]
            m = s["median"]
            gops = info["ops"] / m / 1e9 if info.get("ops") else None
            la = info.get("loadavg")
            out.append(
                f"| {name} | {impl} | {m * 1e3:.3f} | {s['min'] * 1e3:.3f} | "
                f"{m / s['min']:.2f}{' (noisy)' if m / s['min'] > NOISY else ''} | {s['rounds']} | "
                f"{'—' if gops is None else f'{gops:.1f}'} | "
                f"{_fmt(_ratio(med.get('float_conv2d'), m))} | "
                f"{_fmt(_ratio(med.get('torch_ao_int8'), m))} | "
                f"{_fmt(_ratio(med.get('oqfl_int8'), m))} | {la[0] if la else '—'} |")
    if not groups:
        out.append("| (no benchmarks in the JSON) |" + " |" * 10)

    # Weight bytes per layer (independent of the batch)
    layers: dict = {}
    for name in groups:
        layer = name.rsplit("-", 1)[0]
        for impl, (_, info) in groups[name].items():
            if info.get("weight_bytes"):
                layers.setdefault(layer, {})[impl] = info["weight_bytes"]
    if layers:
        out += ["", "Weight bytes per layer (float32 tensor; torch.ao: its qint8 codes, the "
                "prepacked size is not visible; oqfl: the blocked layout, int4 two codes a byte):",
                "", "| layer | float32 | torch.ao int8 | oqfl int8 | oqfl int4 | int4 / int8 |",
                "|---|---:|---:|---:|---:|---:|"]
        for layer in sorted(layers, key=lambda n: _group_key(n + "-b0")):
            wb = layers[layer]
            cells = [f"{wb[i]:,}" if wb.get(i) else "—" for i in IMPLS]
            ratio = _ratio(wb.get("oqfl_int4"), wb.get("oqfl_int8"))
            out.append(f"| {layer} | " + " | ".join(cells) + f" | {_fmt(ratio, '')} |")

    verdicts = []
    for name in sorted(groups, key=_group_key):
        med = {impl: s["median"] for impl, (s, _) in groups[name].items()}
        noisy = {impl for impl, (s, _) in groups[name].items()
                 if s["min"] and s["median"] / s["min"] > NOISY}
        batch = next(iter(groups[name].values()))[1].get("batch")
        ao_f = _ratio(med.get("float_conv2d"), med.get("torch_ao_int8"))
        if ao_f is not None:
            verdicts.append(f"- {name}: (baseline) torch.ao int8 is {ao_f:.2f}× float F.conv2d")
        for desc, num, den, batches, thr in TARGETS:
            if batch not in batches:
                continue
            r = _ratio(med.get(num), med.get(den))
            if r is None:
                verdicts.append(f"- {name}: {desc} >= {thr}×: not measured")
            else:
                verdicts.append(f"- {name}: {desc} = {r:.2f}× (target >= {thr}×: "
                                f"{'met' if r >= thr else 'NOT met'})"
                                + ("; noisy timing, rerun on an idle machine"
                                   if noisy & {num, den} else ""))
    if verdicts:
        out += ["", "Targets (speedup = baseline median / oqfl median):"] + verdicts
    checks = {name: next((i.get("check") for _, i in g.values() if i.get("check")), None)
              for name, g in groups.items()}
    if any(checks.values()):
        out += ["", "Agreement checks passed before timing (first images vs the exact float64 "
                "result of the codes; `int8~ao` over the whole batch, in torch.ao output steps):"]
        out += [f"- {n}: {checks[n]}" for n in sorted(checks, key=_group_key) if checks[n]]
    out += skipped_lines(data)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    return report_main(argv, doc=__doc__, suite=SUITE, render=render,
                       default_stem=lambda data: DEFAULT_NAME, min_rounds=DEFAULT_MIN_ROUNDS,
                       max_time=DEFAULT_MAX_TIME)


if __name__ == "__main__":
    sys.exit(main())
