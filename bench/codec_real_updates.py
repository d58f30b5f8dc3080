#!/usr/bin/env python
"""Uplink bytes of real W4A4 client updates, version 2 with the default compression (zstd),
against the float32 values of the same update (4 bytes per value).

    python bench/codec_real_updates.py [--rounds 2] [--save NAME]

Runs the CLI (oqfl_ext.fl) for each network of docs/RESULTS.md (14x14 Fashion-MNIST, width 16;
the small CNN is also the CLI's default, the README's demo) on a small federation (2000 training
images, 4 clients, all sampled), then divides the float32 bytes of one update by the bytes a
client sent per round (metrics.json). Needs Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

NETS = (("small_cnn", "14", "small CNN (the demo's and RESULTS', 14x14)"),
        ("vgg", "14", "VGG (RESULTS, 14x14)"), ("resnet20", "14", "ResNet-20 (RESULTS, 14x14)"))


def main(argv=None) -> int:
    import torch
    from oqfl_ext.fl.client import float_state
    from oqfl_ext.fl.experiment import ExperimentConfig, model_fn
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--save", metavar="NAME")
    args = p.parse_args(argv)
    rows = ["| network | values per update | compression | bytes per client and round "
            "(mean) | float32 / sent |", "|---|---:|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for net, size, label in NETS:
            cfg = ExperimentConfig(model=net, image_size=int(size))
            image = int(size)
            numel = sum(v.numel() for v in
                        float_state(model_fn(cfg, 1, 10, image)().state_dict()).values())
            for comp in ("none", "zstd"):
                out = Path(tmp) / f"{net}-{size}-{comp}"
                cmd = [sys.executable, "-m", "oqfl_ext.fl", "--model", net, "--train-subset",
                       "2000", "--test-subset", "500", "--clients", "4", "--fraction", "1",
                       "--rounds", str(args.rounds), "--uplink-compression", comp, "--quiet",
                       "--threads", "1", "--no-eval-integer", "--image-size", size,
                       "--out", str(out)]
                subprocess.run(cmd, check=True, cwd=BENCH_DIR.parent, stdout=subprocess.DEVNULL)
                rounds = json.loads((out / "metrics.json").read_text())["rounds"]
                sent = (sum(r["uplink_bytes"] for r in rounds)
                        / sum(len(r["accepted"]) for r in rounds))
                rows.append(f"| {label} | {numel:,} | {comp} | {sent:,.0f} "
                            f"| {4 * numel / sent:.2f}x |")
    text = (f"## Real W4A4 updates, version 2 ({args.rounds} rounds, 4 clients x 500 "
            f"images)\n\ntorch {torch.__version__}\n\n" + "\n".join(rows) + "\n")
    print(text)
    if args.save:
        (BENCH_DIR / "results" / f"{args.save}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
