#!/usr/bin/env python
"""Run the wire-format and federated-round benchmarks and print a markdown report.

    python bench/report_codec.py                 # run (~2 min on 2 cores), print the report
    python bench/report_codec.py --save          # ... and write bench/results/codec.md (+ .json)
    python bench/report_codec.py --save NAME     # ... as bench/results/NAME.md / NAME.json
    python bench/report_codec.py results.json    # report from an existing pytest-benchmark JSON
    python bench/report_codec.py -k codec        # a subset (pytest -k)

Three tables (see test_bench_codec.py): (a) blob bytes of a ResNet-18-sized update over its
float32 bytes (targets: int4 <= 12.7 %, int8 <= 25.5 %); (b) encode + decode throughput in GB/s
of float32 input on 2 threads (target >= 1 GB/s for int4 and int8), with the time of each
stage; (c) the time of a federated round, OQFL W4A4 over FP32 FedAvg (target <= 1.5x).
Targets are printed with the measured ratios, never asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import machine_lines, report_main, skipped_lines  # noqa: E402  (shared)

SUITE = BENCH_DIR / "test_bench_codec.py"
DEFAULT_MIN_ROUNDS = 5
DEFAULT_MAX_TIME = 1.0
BYTES_TARGETS = {4: 0.127, 8: 0.255}
GBPS_TARGET = 1.0
ROUND_TARGET = 1.5
STAGES = ("scales", "quantize_pack", "digest", "compress", "decompress", "unpack_dequantize")
STAGE_WHAT = {"scales": "per-channel absmax step sizes",
              "quantize_pack": "oqfl::quantize_pack op (stochastic)",
              "digest": "SHA-256 of the blob (sender)",
              "compress": "zstd compression of the blob",
              "decompress": "bounded zstd decompression + SHA-256 beside it (receiver)",
              "unpack_dequantize": "oqfl::unpack_dequantize op"}


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _groups(data: dict) -> dict:
    groups: dict = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups.setdefault(b.get("group") or "?", {})[info.get("impl")] = (b["stats"], info)
    return groups


def render(data: dict) -> str:
    groups = _groups(data)
    out = ["## Federated wire formats and round time", ""]
    out += machine_lines(data)
    verdicts = []

    codec = {name: g for name, g in groups.items() if name.startswith("codec-")}
    order = sorted(codec, key=lambda n: {"int4": 0, "int8": 1, "f32": 2}.get(
        n.split("-")[2], 9))
    # (a) bytes
    out += ["", "### (a) Update size: ResNet-18-sized update (torchvision resnet18 state_dict "
            "floating-point shapes)", "",
            "`blob` = the encoded update's length before compression (header, digest, "
            "steps and vectors included; docs/DESIGN.md 4.2); `float32` = 4 bytes per value.",
            "",
            "| codec | values | blob bytes | codes/values | steps + vectors | header + digest "
            "| float32 bytes | blob / float32 | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in order:
        stats_info = codec[name].get("roundtrip") or next(iter(codec[name].values()))
        info = stats_info[1]
        bits, fb = info.get("bits"), info.get("float_bytes")
        blob = info.get("raw_bytes", info.get("blob_bytes"))  # before compression
        if not (blob and fb):
            continue
        ratio = blob / fb
        target = BYTES_TARGETS.get(bits)
        tcell = f"<= {target:.1%}: {_verdict(ratio <= target)}" if target else "—"
        out.append(f"| {name.split('-')[2]} | {info.get('numel'):,} | {blob:,} | "
                   f"{_int(info.get('data_bytes'))} | {_int(info.get('scale_bytes'))} | "
                   f"{_int(info.get('header_bytes'))} ({_int(info.get('metadata_bytes'))}) | "
                   f"{fb:,} | {ratio:.2%} | {tcell} |")
        if target:
            verdicts.append(f"- bytes int{bits}: {ratio:.2%} of float32 (target <= {target:.1%}: "
                            f"{_verdict(ratio <= target)})")
    # (b) throughput
    out += ["", f"### (b) Encode + decode throughput ({_threads(codec)} threads)", "",
            "Medians in ms; GB/s = float32 bytes of the update / median. Stochastic rounding "
            "for int4/int8. `copy` = `dst.copy_(src)` of the same float32 bytes.", "",
            "| codec | encode+decode ms | GB/s | GB/s at the min | encode ms | decode ms "
            "| copy ms | copy GB/s | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in order:
        g = codec[name]
        fb = next(iter(g.values()))[1].get("float_bytes")
        med = {impl: s["median"] for impl, (s, _) in g.items()}
        rt = med.get("roundtrip")
        gbps = fb / rt / 1e9 if (rt and fb) else None
        cp = med.get("copy")
        short = name.split("-")[2]
        tcell = "—"
        if short != "f32" and gbps is not None:
            tcell = f">= {GBPS_TARGET:g} GB/s: {_verdict(gbps >= GBPS_TARGET)}"
            verdicts.append(f"- throughput {short}: {gbps:.3f} GB/s (target >= {GBPS_TARGET:g}: "
                            f"{_verdict(gbps >= GBPS_TARGET)}); the round trip must take <= "
                            f"{fb / GBPS_TARGET / 1e6:.1f} ms, it takes {rt * 1e3:.1f} ms")
        rmin = g["roundtrip"][0]["min"] if "roundtrip" in g else None
        out.append(f"| {short} | {_ms(rt)} | {_num(gbps, 3)} | "
                   f"{_num(fb / rmin / 1e9 if (rmin and fb) else None, 3)} | "
                   f"{_ms(med.get('encode'))} | "
                   f"{_ms(med.get('decode'))} | {_ms(cp)} | "
                   f"{_num(fb / cp / 1e9 if (cp and fb) else None, 1)} | {tcell} |")
    stage_rows = []
    for name in order:
        g = codec[name]
        med = {impl: s["median"] for impl, (s, _) in g.items()}
        rt = med.get("roundtrip")
        kern = [med.get("stage_quantize_pack"), med.get("stage_unpack_dequantize")]
        fb = next(iter(g.values()))[1].get("float_bytes")
        if rt and fb and None not in kern and fb / rt / 1e9 < GBPS_TARGET:
            verdicts.append(f"  - {name.split('-')[2]}: the two packing ops alone take "
                            f"{sum(kern) * 1e3:.1f} ms ({sum(kern) / rt:.0%} of the round "
                            f"trip); the rest of the codec {max(rt - sum(kern), 0) * 1e3:.1f} "
                            "ms. Reaching the target needs faster CPU kernels of "
                            "oqfl::quantize_pack / unpack_dequantize (csrc/cpu/packing_cpu.cpp)"
                            if sum(kern) > 0.5 * rt else
                            f"  - {name.split('-')[2]}: the packing ops take "
                            f"{sum(kern) / rt:.0%} of the round trip")
        for st in STAGES:
            m = med.get("stage_" + st)
            if m is None:
                continue
            share = f"{m / rt:.0%}" if rt else "—"
            stage_rows.append(f"| {name.split('-')[2]} | {st} | {STAGE_WHAT[st]} | {_ms(m)} | "
                              f"{share} |")
    if stage_rows:
        out += ["", "Where the time goes (each stage timed alone over all entries; "
                "`share` = stage median / round-trip median):", "",
                "| codec | stage | what | median ms | share |", "|---|---|---|---:|---:|"]
        out += stage_rows
    # (c) round time
    fl = {name: g for name, g in groups.items() if name.startswith("fl-round")}
    for name, g in sorted(fl.items()):
        base = g.get("fp32_fedavg", (None, None))[0]
        out += ["", f"### (c) Federated round time ({name})", ""]
        any_info = next(iter(g.values()))[1]
        out += [f"{any_info.get('clients')} clients x {any_info.get('samples_per_client')} "
                f"Fashion-MNIST images, 1 local epoch, evaluation on "
                f"{any_info.get('test_samples')} test images; "
                "`Server.run_round` wall time (training, codecs, aggregation, evaluation).", "",
                "| variant | median s | min s | rounds | x fp32 | uplink bytes | downlink bytes "
                "| accuracy after the last round |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in ("fp32_fedavg", "oqfl_w4a4", "oqfl_w4a4_int8down"):
            if v not in g:
                continue
            s, info = g[v]
            ratio = s["median"] / base["median"] if base else None
            out.append(f"| {v} | {s['median']:.3f} | {s['min']:.3f} | {s['rounds']} | "
                       f"{_num(ratio, 2)} | {_int(info.get('uplink_bytes'))} | "
                       f"{_int(info.get('downlink_bytes'))} | {_num(info.get('accuracy'), 3)} |")
            if v == "oqfl_w4a4" and ratio is not None:
                verdicts.append(f"- round time oqfl_w4a4 / fp32_fedavg = {ratio:.2f} (target <= "
                                f"{ROUND_TARGET}: {_verdict(ratio <= ROUND_TARGET)})")
    if verdicts:
        out += ["", "### Targets", ""] + verdicts
    out += skipped_lines(data)
    return "\n".join(out) + "\n"


def _threads(codec: dict):
    for g in codec.values():
        for _, info in g.values():
            if info.get("torch_num_threads"):
                return info["torch_num_threads"]
    return "?"


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(v, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _int(v) -> str:
    return "—" if v is None else f"{v:,}"


def main(argv=None) -> int:
    return report_main(argv, doc=__doc__, suite=SUITE, render=render,
                       default_stem=lambda data: "codec", min_rounds=DEFAULT_MIN_ROUNDS,
                       max_time=DEFAULT_MAX_TIME)


if __name__ == "__main__":
    sys.exit(main())
