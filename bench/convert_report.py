#!/usr/bin/env python
"""Conversion report: accuracy of the integer model against its fake-quant twin, and file sizes.

    python bench/convert_report.py                 # train (~2-3 min on 2 idle cores), print it
    python bench/convert_report.py --save          # ... and write bench/results/convert.md
    python bench/convert_report.py --epochs 1 --train-limit 20000   # quicker

1. Accuracy: a SmallCNN (width 16) quantized by ``quantize_model`` at W4A4 (first and last
   layers 8 bits) is trained on Fashion-MNIST (SGD momentum, cosine schedule), then evaluated on
   the 10000 test images as the fake-quant model and as ``oqfl_ext.convert``'s integer model
   (prediction agreement, largest logit difference). Three times: as trained, where the LSQ+
   offset of the signed first-layer input is a float that conversion rounds to an integer zero
   point; after rounding that offset in the fake-quant model too, where both compute the same
   codes; and with the offset moved to round(z) + 0.3, to show what a fractional offset costs.
2. File sizes: the float32 ``state_dict`` (safetensors) of ResNet-20 and of the trained
   SmallCNN against ``oqfl_ext.save_packed`` of their W4 (8-bit first/last layers) and W8
   versions. Target: ResNet-20 W4 <= 1/7 of the float32 state_dict.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.data import load_fashion_mnist
from oqfl_ext.nn import LSQQuantizer, calibrate, convert, load_packed, save_packed

RESULTS = Path(__file__).resolve().parent / "results" / "convert.md"


def train(epochs: int, limit: int, batch: int, lr: float, seed: int):
    x_train, y_train = load_fashion_mnist("train", limit=limit, normalize=True)
    torch.manual_seed(seed)
    model = oqfl_ext.quantize_model(models.create("small_cnn", in_channels=1, image_size=28),
                                    weight_bits=4, act_bits=4, first_last_bits=8)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(x_train)
    steps = epochs * -(-n // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, batch):
            if i % (100 * batch) == 0:
                print(f"epoch {epoch + 1}/{epochs}: {i}/{n} images, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), time.perf_counter() - t0, n


@torch.no_grad()
def predict(model, x, batch: int = 1000):
    t0 = time.perf_counter()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return out, time.perf_counter() - t0


def offsets(model):
    return [(name, float(m.offset.item())) for name, m in model.named_modules()
            if isinstance(m, LSQQuantizer) and m.offset is not None and m.uses_offset]


def accuracy_section(args) -> list:
    x_test, y_test = load_fashion_mnist("test", normalize=True)
    model, train_s, n = train(args.epochs, args.train_limit, args.batch, args.lr, args.seed)
    lines = ["## Fashion-MNIST: SmallCNN W4A4 (first/last 8 bits), fake-quant vs integer",
             "", f"Trained {args.epochs} epoch(s) on {n} images (batch {args.batch}, SGD "
             f"momentum 0.9, lr {args.lr} cosine, seed {args.seed}) in {train_s:.0f} s; "
             f"evaluated on the {len(x_test)} test images.", "",
             "| variant | zero points | fake-quant acc | integer acc | agreement "
             "| max abs logit diff | fake-quant s | integer s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    trained_offsets = {name: m.offset.detach().clone() for name, m in model.named_modules()
                       if isinstance(m, LSQQuantizer) and m.offset is not None}
    for variant in ("as trained", "offsets rounded", "offsets rounded + 0.3"):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LSQQuantizer) and m.offset is not None:
                    if variant == "offsets rounded":
                        m.offset.round_()
                    elif variant == "offsets rounded + 0.3":
                        m.offset.add_(0.3)
        offs = offsets(model)
        ref, t_ref = predict(model, x_test)
        conv = convert(model)
        got, t_int = predict(conv, x_test)
        acc_ref = (ref.argmax(1) == y_test).float().mean().item()
        acc_int = (got.argmax(1) == y_test).float().mean().item()
        agree = (ref.argmax(1) == got.argmax(1)).float().mean().item()
        zps = ", ".join(f"{name.rsplit('.', 1)[0]}: z={z!r}" for name, z in offs) or "none"
        lines.append(f"| {variant} | {zps} | {acc_ref:.4f} | {acc_int:.4f} | {agree:.4f} "
                     f"| {(got - ref).abs().max().item():.3g} | {t_ref:.2f} | {t_int:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    with torch.no_grad():   # leave the model as trained (it is measured again below)
        for name, z in trained_offsets.items():
            model.get_submodule(name).offset.copy_(z)
    lines += ["", "Only the first layer's input is signed (standardized pixels) and has an LSQ+ "
              "offset z; every other input follows a ReLU (unsigned, no offset). `as trained`: "
              "conversion rounds z to the integer zero point round(z), which shifts that "
              "layer's input grid by (z - round(z)) steps. `offsets rounded`: z rounded in the "
              "fake-quant model as well (no retraining), so both models compute the same codes "
              "and differ by float rounding only. `offsets rounded + 0.3`: an illustration of a "
              "fractional offset (z = round(z) + 0.3 in the fake-quant model, which the "
              "conversion rounds back): the cost of the integer zero point when the trained "
              "offset is not an integer. Times: the whole test set, batch 1000, "
              f"{torch.get_num_threads()} threads, on a machine shared with other jobs "
              "(indicative only; the kernel speed is measured in bench/report_qconv.py)."]
    if all(bool(torch.equal(z, z.round())) for z in trained_offsets.values()):
        lines += ["", "Here the trained offset is still the integer of its initialization: an "
                  "LSQ+ offset only receives gradient from clamped inputs (docs/DESIGN.md section 2), "
                  "and the initial range covered every pixel value, so none was clamped. The "
                  "converted model is then exact up to float rounding."]
    return lines, model


def _packed_size(model, folder: Path, stem: str, probe: torch.Tensor) -> int:
    p = folder / f"{stem}.safetensors"
    save_packed(model, p)
    # the file loads back (validated) into a model that computes what the converted one does
    loaded = load_packed(p)
    with torch.no_grad():
        want = convert(model)(probe)
        got = loaded(probe)
    if not torch.equal(got, want):
        raise AssertionError(f"{stem}: the loaded packed model differs from the converted one")
    return p.stat().st_size


def _float_size(model, folder: Path, stem: str) -> int:
    from safetensors.torch import save_file
    p = folder / f"{stem}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(p))
    return p.stat().st_size


def size_section(trained_small) -> list:
    lines = ["## File sizes: float32 state_dict vs save_packed", "",
             "`float32`: the float model's state_dict in one safetensors file "
             "(safetensors.torch.save_file). `fake-quant`: the state_dict of the quantized "
             "training model (float weights plus quantizer step sizes/offsets). `W4`: "
             "quantize_model(weight_bits=4, act_bits=4) with the first and last layers at 8 bits "
             "(its default), converted and saved with save_packed; `W8`: everything at 8 bits. "
             "save_packed stores the compact codes (ops.pack: int4 two per byte), float32 "
             "per-channel weight scales, input scales/zero points, biases and BatchNorm "
             "tensors, and the architecture as JSON metadata.", "",
             "| model | params | float32 bytes | fake-quant bytes | W4 bytes | float32 / W4 "
             "| W8 bytes | float32 / W8 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdict = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs = [("resnet20", dict(), (2, 3, 32, 32)),
                 ("small_cnn", dict(in_channels=1, image_size=28), (2, 1, 28, 28))]
        for name, kwargs, shape in specs:
            torch.manual_seed(0)
            fmodel = models.create(name, **kwargs).eval()
            params = sum(p.numel() for p in fmodel.parameters())
            f32 = _float_size(fmodel, folder, f"{name}-f32")
            x = torch.randn(shape)
            sizes = {}
            for bits in (4, 8):
                if name == "small_cnn" and bits == 4 and trained_small is not None:
                    q = trained_small
                else:
                    q = oqfl_ext.quantize_model(fmodel, weight_bits=bits, act_bits=bits,
                                                first_last_bits=8)
                    calibrate(q, x)
                if bits == 4:
                    fq = _float_size(q, folder, f"{name}-fq")
                sizes[bits] = _packed_size(q.eval(), folder, f"{name}-w{bits}", x)
            label = name + (" (W4: trained above)" if name == "small_cnn"
                            and trained_small is not None else "")
            lines.append(f"| {label} | {params} | {f32} | {fq} | {sizes[4]} "
                         f"| {f32 / sizes[4]:.2f}x | {sizes[8]} | {f32 / sizes[8]:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
            if name == "resnet20":
                ok = sizes[4] * 7 <= f32
                verdict.append(f"ResNet-20 W4 file = 1/{f32 / sizes[4]:.2f} of the float32 "
                               f"state_dict: target <= 1/7 **{'met' if ok else 'NOT met'}**.")
    return lines + [""] + verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes-only", action="store_true", help="skip the training")
    ap.add_argument("--save", action="store_true", help=f"write {RESULTS}")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    head = ["# Conversion report (oqfl_ext.convert, save_packed)", "",
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
            f"oqfl_ext {oqfl_ext.__version__}, {platform.machine()} "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, CPU path "
            f"{oqfl_ext.ops.cpu_capability()}.", ""]
    body, trained = [], None
    if not args.sizes_only:
        acc, trained = accuracy_section(args)
        body += acc + [""]
    body += size_section(trained)
    text = "\n".join(head + body) + "\n\n" + \
        f"Report generated by `python bench/convert_report.py` in " \
        f"{time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if args.save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
