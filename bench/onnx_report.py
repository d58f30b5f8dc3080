#!/usr/bin/env python
"""ONNX Runtime next to oqfl_ext on the same converted integer models.

    python bench/onnx_report.py                 # print the report
    python bench/onnx_report.py --save          # ... and write bench/results/onnx-cpu-2t-<date>.md
    python bench/onnx_report.py --quick         # small networks, fewer repeats

For each network (random weights with settled BatchNorm statistics, quantized W4A4 with 8-bit
first and last layers by ``quantize_model``, calibrated, ``convert``ed): the package's integer
model (``IntegerGraph``, torch threads 2) and the same model exported by
``oqfl_ext.export_onnx`` run by ONNX Runtime's CPU provider (2 intra-op threads, default graph
optimizations), batch 1 and 32, float32 input to float32 logits. Before timing, both run the
timed batch and must give the same class on every input (docs/DESIGN.md section 7.3 bounds
the difference), so the ratio compares the same computation. Timing: warm-up, then the two
implementations alternate, each repetition timed on its own; medians. Ratio = ours / ONNX
Runtime (> 1: ONNX Runtime is faster).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import oqfl_ext  # noqa: E402
from oqfl_ext import models, ops  # noqa: E402
from oqfl_ext.nn import LSQQuantizer, calibrate, convert  # noqa: E402
from conftest import torch_machine_info  # noqa: E402  (the benchmarks' machine record)

THREADS = 2   # --threads


def _settle_and_quantize(model: nn.Module, x: torch.Tensor) -> nn.Module:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    model = oqfl_ext.quantize_model(model.eval())
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.init = "lsq"
    calibrate(model.eval(), x)
    return model.eval()


def networks(quick: bool):
    """(label, float model, input shape without the batch)."""
    out = [("small_cnn 28px", lambda: models.create("small_cnn", in_channels=1, image_size=28),
            (1, 28, 28)),
           ("vgg 32px", lambda: models.create("vgg"), (3, 32, 32)),
           ("resnet20 32px", lambda: models.create("resnet20"), (3, 32, 32)),
           ("mobilenet_v2 (zoo) 32px", lambda: models.create("mobilenet_v2"), (3, 32, 32))]
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None:
        side = 64 if quick else 112
        out.append((f"resnet18 {side}px", lambda: torchvision.models.resnet18(), (3, side, side)))
    return out


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(quick: bool, reps: int):
    import onnxruntime as ort
    from oqfl_ext import export_onnx
    torch.set_num_threads(THREADS)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="oqfl-onnx-bench-"))
    for label, ctor, shape in networks(quick):
        torch.manual_seed(0)
        calib = torch.randn(16, *shape)
        gm = convert(_settle_and_quantize(ctor(), calib))
        path = tmp / "m.onnx"
        export_onnx(gm, path, calib[:1])
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name
        size = path.stat().st_size
        for batch in (1, 32):
            x = torch.randn(batch, *shape)
            xn = x.numpy()
            with torch.no_grad():
                want = gm(x)
            got = torch.from_numpy(sess.run(None, {iname: xn})[0])
            same = bool((got.argmax(1) == want.argmax(1)).all())
            maxdiff = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
            if not same:
                raise SystemExit(f"{label} batch {batch}: ONNX Runtime and oqfl_ext disagree "
                                 "on a class; not timing different computations")

            def ours():
                with torch.no_grad():
                    gm(x)

            def theirs():
                sess.run(None, {iname: xn})

            for _ in range(2):
                ours()
                theirs()
            n = max(3, reps if batch == 1 else reps // 4)
            t_ours, t_ort = [], []
            for _ in range(n):
                t_ours.append(_time(ours))
                t_ort.append(_time(theirs))
            m_ours, m_ort = statistics.median(t_ours), statistics.median(t_ort)
            rows.append(dict(network=label, batch=batch, ours_ms=m_ours * 1e3,
                             ort_ms=m_ort * 1e3, ratio=m_ours / m_ort, reps=n,
                             onnx_bytes=size, rel_diff=maxdiff,
                             noisy=max(t_ours) > 2 * min(t_ours) or
                             max(t_ort) > 2 * min(t_ort)))
            print(f"{label} batch {batch}: ours {m_ours * 1e3:.3f} ms, ONNX Runtime "
                  f"{m_ort * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    want = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    return ", ".join(f for f in want if f in flags) or "none of " + ", ".join(want)


def render(rows, load_before, load_after, commit: str) -> str:
    import onnx
    import onnxruntime as ort
    mi = torch_machine_info()
    lines = [
        "## ONNX Runtime vs oqfl_ext on the converted integer models",
        "",
        f"- CPU: {mi['cpu_model']}, {mi['logical_cpus']} logical CPUs; flags: {_cpu_flags()}",
        f"- ISA path: oqfl_ext.ops.cpu_capability() = {ops.cpu_capability()}, "
        f"torch.backends.cpu.get_cpu_capability() = {mi['torch_cpu_capability']}",
        f"- torch {torch.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider, "
        f"graph optimizations: all), onnx {onnx.__version__}, Python "
        f"{platform.python_version()}",
        f"- threads: torch {THREADS}, ONNX Runtime intra-op {THREADS}",
        f"- commit: {commit}; date: {_dt.datetime.now(_dt.timezone.utc).isoformat()}",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after}",
        "",
        "W4A4 (8-bit first and last layers), random weights with settled BatchNorm statistics, "
        "float32 input to float32 logits. Medians of alternating single runs. `ratio` = ours / "
        "ONNX Runtime (> 1: ONNX Runtime faster). `max rel diff`: largest logit difference / "
        "largest logit on the timed batch (same class on every input, checked). `noisy`: "
        "max/min above 2.",
        "",
        "| network | batch | oqfl_ext ms | ONNX Runtime ms | ratio | reps | max rel diff | "
        ".onnx bytes | noisy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['network']} | {r['batch']} | {r['ours_ms']:.3f} | "
                     f"{r['ort_ms']:.3f} | {r['ratio']:.2f}x | {r['reps']} | "
                     f"{r['rel_diff']:.1e} | {r['onnx_bytes']} | "
                     f"{'yes' if r['noisy'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", action="store_true",
                   help="write bench/results/onnx-cpu-<threads>t-<date>.md")
    p.add_argument("--quick", action="store_true", help="resnet18 at 64px, fewer repeats")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions at batch 1")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads and ONNX Runtime intra-op threads (default 2)")
    args = p.parse_args(argv)
    THREADS = args.threads
    reps = args.reps or (8 if args.quick else 40)
    load_before = [round(v, 2) for v in os.getloadavg()]
    commit = _commit()   # the code that runs, before anything can change the tree
    rows = run(args.quick, reps)
    text = render(rows, load_before, [round(v, 2) for v in os.getloadavg()], commit)
    print(text)
    if args.save:
        out = HERE / "results" / f"onnx-cpu-{THREADS}t-{_dt.date.today().isoformat()}.md"
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
