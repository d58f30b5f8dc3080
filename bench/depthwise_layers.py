#!/usr/bin/env python
"""Per-layer timing of mobilenet_v2's depthwise 3x3 convolutions (112x112 input): float32
F.conv2d against oqfl::qconv2d with int8 and int4 weights, 2 threads, medians.

    python bench/depthwise_layers.py              # print the markdown table
    python bench/depthwise_layers.py --save NAME  # ... and write bench/results/NAME.md

Both sides take a float32 channels_last input and return float32 (oqfl quantizes the input
inside the op, as a converted network's first consumer does); the float baseline is the faster
of NCHW and channels_last. Before timing, oqfl's output is checked against F.conv2d in float64
on the dequantized tensors. Issue 14's target: oqfl >= 3x float. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import oqfl_ext  # noqa: F401  (registers the ops)
from oqfl_ext import ops

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
# (channels, input size, stride) of mobilenet_v2's depthwise layers at a 112x112 input
LAYERS = [(32, 56, 1), (96, 56, 2), (144, 28, 1), (144, 28, 2), (192, 14, 1), (192, 14, 2),
          (384, 7, 1), (576, 7, 1), (576, 7, 2), (960, 4, 1)]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _median_ms(fn, repeats: int = 25) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _layer(batch: int, channels: int, size: int, stride: int):
    gen = torch.Generator().manual_seed(channels * 7 + size + stride)
    x = torch.randn(batch, channels, size, size, generator=gen).clamp_min(0)  # after ReLU6
    w = torch.randn(channels, 1, 3, 3, generator=gen) * 0.5
    bias = torch.randn(channels, generator=gen) * 0.1
    x_scale, x_zp = float(x.max()) / 255, 0
    row = {}
    for bits in (8, 4):
        qmax = (1 << (bits - 1)) - 1
        w_scale = (w.abs().amax(dim=(1, 2, 3)) / qmax).clamp_min(1e-8)
        codes = torch.round(w / w_scale[:, None, None, None]).clamp(-qmax - 1, qmax).to(torch.int8)
        packed = ops.pack_conv_weight(codes, bits, groups=channels)
        xs, xz = torch.tensor(x_scale), torch.tensor(x_zp)
        xcl = x.contiguous(memory_format=torch.channels_last)

        def oqfl(bits=bits, packed=packed, w_scale=w_scale):
            return ops.qconv2d(xcl, xs, xz, packed, w_scale, bias, w_bits=bits, stride=stride,
                               padding=1, groups=channels)
        # exactness check: float64 convolution of the dequantized input and weights
        # (the input codes as the op computes them: x / s in float32, rounded half to even)
        xq = torch.clamp(torch.round(x / xs) + x_zp, 0, 255).double()
        ref = F.conv2d((xq - x_zp) * float(xs), codes.double() * w_scale.double()[:, None, None, None],
                       bias.double(), stride, 1, 1, channels)
        err = (oqfl().double() - ref).abs().max().item()
        assert err <= 1e-3 * (ref.abs().max().item() + 1), f"{channels}ch: error {err}"
        row[f"int{bits}"] = _median_ms(oqfl)
    nchw = _median_ms(lambda: F.conv2d(x, w, bias, stride, 1, 1, channels))
    xcl = x.contiguous(memory_format=torch.channels_last)
    wcl = w.contiguous(memory_format=torch.channels_last)
    cl = _median_ms(lambda: F.conv2d(xcl, wcl, bias, stride, 1, 1, channels))
    row["float"] = min(nchw, cl)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save", metavar="NAME", help="also write bench/results/NAME.md")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    try:
        load = " / ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    except OSError:
        load = "n/a"
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=RESULTS.parent.parent).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (dirty)"
    lines = [
        "## Depthwise 3x3 layers of mobilenet_v2 (112x112 input): float32 F.conv2d vs oqfl",
        "",
        f"- CPU: {_cpu_model()}, torch threads: {THREADS}, torch CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}",
        f"- oqfl_ext CPU path: {ops.cpu_capability()}; torch {torch.__version__}; commit {commit}",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; load average "
        f"before: {load}",
        "- medians of 25 calls after 3 warm-up calls; float = the faster of NCHW and "
        "channels_last; oqfl: float32 channels_last in, float32 out, input quantized in the op",
        "",
        "| layer | batch | float ms | oqfl int8 ms | oqfl int4 ms | int8 x float | int4 x float |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for batch in (32, 1):
        for c, s, stride in LAYERS:
            r = _layer(batch, c, s, stride)
            ratios.append(r["float"] / r["int8"])
            lines.append(f"| {c}ch {s}x{s} s{stride} | {batch} | {r['float']:.3f} | "
                         f"{r['int8']:.3f} | {r['int4']:.3f} | {r['float'] / r['int8']:.2f} | "
                         f"{r['float'] / r['int4']:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Target (issue 14): oqfl >= 3x float per depthwise layer: met on "
              f"{sum(x >= 3 for x in ratios)} of {len(ratios)} (int8 x float "
              f"{min(ratios):.2f} to {max(ratios):.2f})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        (RESULTS / f"{args.save}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
