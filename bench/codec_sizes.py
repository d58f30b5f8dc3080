#!/usr/bin/env python
"""Update transfer, version 2 (docs/DESIGN.md section 4.2): bytes and speed per model.

    python bench/codec_sizes.py                 # print the markdown report
    python bench/codec_sizes.py --save NAME     # ... and write bench/results/NAME.md

For each model, one update with the shapes of the floating-point state a client sends (W4A4
models as the federated runs build them: first/last layers 8-bit; the ResNet-18-sized update
has the shapes of torchvision's resnet18 state), values N(0, 0.01^2) (seeded):

* overhead bytes: everything in the uncompressed blob that is not a code, a step or a vector
  value (header, client id, padding, digest), and its share of the int4 blob;
* float32 bytes (4 per value) over the blob's bytes, uncompressed and with each compression;
* encode + decode time of the whole update (stochastic rounding, the receiver's checks),
  median of ``--repeat`` runs on ``--threads`` threads, as float32-equivalent GB/s (4 bytes per
  value / median).

The compressed downlink (``--downlink-table``, docs/DESIGN.md section 4.3a): one version step of
``int4-delta`` for the same models, the global model alternating between two N(0, 0.01^2)
states: the server's step (``G - B``, encode, ``B += decode``, state digest, the zstd blob) plus
the client's (decompress, checks, decode, apply, digest check), as float32-equivalent GB/s, and
the delta and snapshot blobs' sizes.

Targets (issue 16) are printed next to the numbers, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # the checkout's package when run from anywhere
COMPRESSIONS = ("none", "zlib", "zstd")


def _updates():
    """name -> (description, update dict)."""
    from oqfl_ext.fl.experiment import ExperimentConfig, model_fn
    from oqfl_ext.fl.client import float_state
    out = {}
    g = torch.Generator().manual_seed(0)

    def rand(state):
        return {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}

    for model, width, label in (("small_cnn", 16, "small CNN, the demo's (width 16, 14x14)"),
                                ("small_cnn", 32, "small CNN (RESULTS, width 32, 14x14)"),
                                ("vgg", 16, "VGG (RESULTS, width 16, 14x14)"),
                                ("resnet20", 16, "ResNet-20 (RESULTS, 14x14)")):
        cfg = ExperimentConfig(model=model, width=width, image_size=14)
        state = float_state(model_fn(cfg, 1, 10, 14)().state_dict())
        out[f"{model}-{width}"] = (label, rand(state))
    import torchvision
    with torch.device("meta"):
        state = torchvision.models.resnet18().state_dict()
    out["resnet18"] = ("ResNet-18-sized update (torchvision shapes)",
                       rand({k: v for k, v in state.items() if v.is_floating_point()}))
    return out


def _median_s(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cpu() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a report line, not a check
        return platform.processor() or "unknown"


def cpu_line(threads: Optional[int] = None) -> str:
    """``CPU: model; ISA path: ...; torch ...[, N threads]; zstandard ...`` (report header)."""
    import oqfl_ext
    isa = getattr(oqfl_ext.ops, "cpu_capability", lambda: "?")()
    return (f"CPU: {_cpu()}; ISA path: {isa}; torch {torch.__version__}"
            f"{f', {threads} threads' if threads else ''}; zstandard {_zstd_version()}.")


def run(repeat: int, threads: int, speed_table: bool = True) -> str:
    from oqfl_ext.fl.codec import decode_update, encode_update, update_layout
    torch.set_num_threads(threads)
    lines = ["## Update transfer v2: bytes and speed per model", "",
             f"{cpu_line(threads)} Median of {repeat} runs.", "",
             "### Bytes (int4 = W4A4 uplink; ratios are float32 bytes / blob bytes)", "",
             "| update | values | overhead bytes | overhead % of int4 blob | int4 none | int4 zlib "
             "| int4 zstd | int8 zstd | float32 zstd |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    speed = ["", f"### Encode + decode (float32-equivalent GB/s; load average before: {load})",
             "",
             "| update | bits | compression | encode+decode ms | GB/s |",
             "|---|---:|---|---:|---:|"]
    gen = torch.Generator().manual_seed(1)
    for key, (label, update) in _updates().items():
        template = {k: torch.zeros_like(v) for k, v in update.items()}
        numel = sum(v.numel() for v in update.values())
        f32 = 4 * numel
        parts = update_layout(template, 4, client_id="client-0")
        overhead = parts["header"] + parts["digest"]
        size = {}
        for bits in (4, 8, 32):
            for comp in COMPRESSIONS:
                size[bits, comp] = len(encode_update(update, bits=bits, client_id="client-0",
                                                     generator=gen, compression=comp))
        assert size[4, "none"] == parts["total"]
        lines.append(f"| {label} | {numel:,} | {overhead} | {100 * overhead / parts['total']:.2f} "
                     f"| {f32 / size[4, 'none']:.2f}x | {f32 / size[4, 'zlib']:.2f}x "
                     f"| {f32 / size[4, 'zstd']:.2f}x | {f32 / size[8, 'zstd']:.2f}x "
                     f"| {f32 / size[32, 'zstd']:.2f}x |")
        for bits, comp in ((4, "zstd"), (4, "none"), (8, "zstd"), (4, "zlib")):
            if not speed_table or (comp == "zlib" and key != "resnet18"):
                continue

            def roundtrip():
                blob = encode_update(update, bits=bits, client_id="client-0", generator=gen,
                                     compression=comp)
                return decode_update(blob, template, compression=comp)

            t = _median_s(roundtrip, repeat if comp != "zlib" else 3)
            speed.append(f"| {label} | {bits} | {comp} | {t * 1e3:.1f} | {f32 / t / 1e9:.3f} |")
    return "\n".join(lines + (speed if speed_table else [])) + "\n"


def run_downlink(repeat: int, threads: int) -> str:
    """The compressed downlink table of the module docstring."""
    from oqfl_ext.fl.codec import decode_update, encode_update
    from oqfl_ext.fl.downlink import DeltaBroadcast, HeldModel
    torch.set_num_threads(threads)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    out = ["## Compressed downlink (int4-delta): bytes and speed per model", "",
           f"{cpu_line(threads)} Median of {repeat} runs.", "",
           f"### One version, server + client "
               f"(float32-equivalent GB/s; load average before: {load})", "",
           "| model | values | delta blob bytes | float32 / delta | snapshot bytes "
           "| server+client ms | GB/s | uplink int4 zstd encode+decode ms (same load) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(2)
    for key, (label, update) in _updates().items():
        states = [update, {k: torch.randn(v.shape, generator=g) * 0.01
                           for k, v in update.items()}]
        template = {k: torch.zeros_like(v) for k, v in update.items()}
        bc, held = DeltaBroadcast(4, ["c"]), HeldModel()
        bc.prepare(states[0], 0)
        snapshot = bc.blob_for("c")[0]
        held.receive(snapshot, template)
        bc.settle("c", "received")
        step = [0]
        sizes = []

        def one_version():
            step[0] += 1
            bc.prepare(states[step[0] % 2], step[0])
            blob, kind = bc.blob_for("c")
            assert kind == "chain"
            held.receive(blob, template)
            bc.settle("c", "received")
            sizes.append(len(blob))

        t = _median_s(one_version, repeat)
        t_up = _median_s(lambda: decode_update(encode_update(update, bits=4, generator=g),
                                               template), repeat)
        f32 = 4 * sum(v.numel() for v in update.values())
        delta = int(statistics.median(sizes))
        out.append(f"| {label} | {f32 // 4:,} | {delta:,} | {f32 / delta:.2f}x "
                   f"| {len(snapshot):,} | {t * 1e3:.1f} | {f32 / t / 1e9:.3f} "
                   f"| {t_up * 1e3:.1f} |")
    return "\n".join(out) + "\n"


def _zstd_version() -> str:
    try:
        import zstandard
        return zstandard.__version__
    except ImportError:
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", metavar="NAME")
    p.add_argument("--bytes-only", action="store_true", help="skip the timings")
    p.add_argument("--downlink-table", action="store_true",
                   help="only the compressed downlink's table")
    args = p.parse_args(argv)
    if args.downlink_table:
        text = run_downlink(args.repeat, args.threads)
    else:
        text = run(args.repeat, args.threads, not args.bytes_only)
    print(text)
    if args.save:
        path = BENCH_DIR / "results" / f"{args.save}.md"
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
