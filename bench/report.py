#!/usr/bin/env python
"""Run the fake_quant benchmarks and print a markdown summary.

    python bench/report.py                    # run the suite (~2-3 min on 2 cores), print the table
    python bench/report.py --save             # ... and write bench/results/<name>.md (+ .json)
    python bench/report.py results.json       # summarize an existing pytest-benchmark JSON
    python bench/report.py -k "act and f32"   # run a subset (pytest -k expression)

One row per benchmark group (case, dtype, mode, device). Columns: the median time of each
implementation in ms; oqfl's speedup over each baseline (baseline median / oqfl median, >1 means
oqfl is faster); oqfl's achieved bandwidth (the op's minimal bytes / its median) in GB/s and as a
fraction of the copy's bandwidth in the same group (2 * nbytes(x) / copy median).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SUITE = BENCH_DIR / "test_bench_fake_quant.py"
RESULTS_DIR = BENCH_DIR / "results"
IMPLS = ("oqfl", "torch_builtin", "eager_lsq", "compiled_lsq", "copy")
BASELINES = (("torch_builtin", "builtin"), ("eager_lsq", "eager"), ("compiled_lsq", "compiled"))

# Chosen to keep a full CPU run near 2 minutes on 2 cores (including torch.compile's compiles,
# which the inductor cache in /tmp makes faster on a second run).
DEFAULT_MIN_ROUNDS = 5
DEFAULT_MAX_TIME = 0.5


def run_suite(json_path: Path, min_rounds: int, max_time: float, keyword: str | None,
              suite: Path = SUITE) -> int:
    """Runs one benchmark file under pytest-benchmark, writing its JSON to json_path."""
    cmd = [
        sys.executable, "-m", "pytest", str(suite),
        "-q", "-rs", "-p", "no:cacheprovider",
        f"--benchmark-json={json_path}",
        f"--benchmark-min-rounds={min_rounds}",
        f"--benchmark-max-time={max_time}",
        "--benchmark-warmup=on",
        "--benchmark-warmup-iterations=2",
        "--benchmark-disable-gc",
        "--benchmark-columns=min,median,max,rounds",
        "--benchmark-sort=name",
    ]
    if keyword:
        cmd += ["-k", keyword]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    # pytest's own output goes to stderr so stdout carries only the report.
    return subprocess.call(cmd, cwd=ROOT, stdout=sys.stderr)


def skipped_lines(data: dict) -> list[str]:
    """The report's "Skipped:" block (one line per distinct reason), or nothing."""
    reasons: dict = {}
    for s in data.get("skipped") or []:
        reasons.setdefault(s.get("reason", ""), []).append(s.get("nodeid", ""))
    if not reasons:
        return []
    return ["", "Skipped:"] + [f"- {len(ids)} × {reason}" for reason, ids in reasons.items()]


def _fmt_ms(seconds):
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def _group_sort_key(name: str):
    # device, then case, dtype, mode in the suite's order
    parts = name.rsplit("-", 3)
    if len(parts) != 4:
        return (9, name)
    case, dtype, mode, device = parts
    return (device != "cpu", case != "act-per-tensor", case, dtype != "f32", dtype, mode != "fwd")


def summarize(data: dict) -> list[dict]:
    groups: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        impl = info.get("impl")
        if impl is None:
            m = re.search(r"-(" + "|".join(IMPLS) + r")\]?$", b.get("name", ""))
            impl = m.group(1) if m else b.get("name")
        g = groups.setdefault(b.get("group") or "?", {"impl": {}, "info": info})
        g["impl"][impl] = b["stats"]["median"]
        if impl != "copy":
            g["info"] = info
    rows = []
    for name in sorted(groups, key=_group_sort_key):
        g = groups[name]
        med = g["impl"]
        info = g["info"]
        row = {"group": name, "median": med}
        ours = med.get("oqfl")
        for impl, short in BASELINES:
            base = med.get(impl)
            row["x_" + short] = (base / ours) if (ours and base) else None
        op_bytes = info.get("op_bytes")
        copy_bytes = info.get("copy_bytes")
        row["gbps"] = (op_bytes / ours / 1e9) if (ours and op_bytes) else None
        copy = med.get("copy")
        if ours and copy and op_bytes and copy_bytes:
            row["bw_frac"] = (op_bytes / ours) / (copy_bytes / copy)
        else:
            row["bw_frac"] = None
        row["copy_gbps"] = (copy_bytes / copy / 1e9) if (copy and copy_bytes) else None
        rows.append(row)
    return rows


def machine_lines(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    cpu = mi.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw") or platform.processor()
    lines = [
        f"- CPU: {cpu}, {mi.get('logical_cpus', '?')} logical CPUs, "
        f"torch threads: {mi.get('torch_num_threads', '?')}, "
        f"torch CPU capability: {mi.get('torch_cpu_capability', '?')}",
        f"- torch {mi.get('torch_version', '?')}, Python {mi.get('python_version', '?')}",
        "- device: " + (f"CUDA {mi.get('cuda_device')} (CUDA {mi.get('cuda_runtime')})"
                        if mi.get("cuda_available") else "CPU only (CUDA groups skipped)"),
    ]
    if mi.get("oqfl_available"):
        lines.append(f"- oqfl_ext: CPU path {mi.get('oqfl_cpu_capability')}, "
                     f"CUDA kernel: {mi.get('oqfl_has_cuda_kernel')}")
    elif "oqfl_available" in mi:
        lines.append(f"- oqfl_ext: NOT available ({mi.get('oqfl_error')})")
    if ci:
        dirty = " (dirty)" if ci.get("dirty") else ""
        lines.append(f"- commit: {str(ci.get('id', '?'))[:12]}{dirty} on {ci.get('branch', '?')}")
    opts = data.get("_report_options")
    if opts:
        lines.append(f"- pytest-benchmark: min rounds {opts['min_rounds']}, max time "
                     f"{opts['max_time']} s, 2 warmup rounds, gc disabled; times are medians")
    lines.append(f"- date: {data.get('datetime', '?')}")
    la = mi.get("loadavg_at_start")
    if la:
        lines.append(f"- load average (1/5/15 min) before the run: {la[0]} / {la[1]} / {la[2]}")
        cpus = mi.get("logical_cpus") or 1
        if la[0] >= 0.5 * cpus:
            lines.append("- **Warning:** the CPU was busy in the minute before the run (another "
                         "job, or a previous run); if something else was running, timings are noisy.")
    return lines


def render(data: dict) -> str:
    rows = summarize(data)
    out = ["## oqfl_ext.ops.fake_quant benchmark", ""]
    out += machine_lines(data)
    out += [
        "",
        "Medians in ms. `×builtin` etc. = baseline median / oqfl median (>1: oqfl faster). "
        "`oqfl GB/s` = minimal bytes (fwd: read x + write y; fwd+bwd: + read grad, read x, "
        "write grad_x) / oqfl median; `BW/copy` = that over the copy's 2·nbytes(x) / copy median.",
        "",
        "| group | oqfl | torch_builtin | eager_lsq | compiled_lsq | copy | ×builtin | ×eager "
        "| ×compiled | oqfl GB/s | copy GB/s | BW/copy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["median"]
        cells = [r["group"]] + [_fmt_ms(m.get(i)) for i in IMPLS]
        cells += [_fmt_ratio(r["x_builtin"]), _fmt_ratio(r["x_eager"]), _fmt_ratio(r["x_compiled"])]
        cells += ["—" if r["gbps"] is None else f"{r['gbps']:.1f}",
                  "—" if r["copy_gbps"] is None else f"{r['copy_gbps']:.1f}",
                  "—" if r["bw_frac"] is None else f"{r['bw_frac']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    if not rows:
        out.append("| (no benchmarks in the JSON) |" + " |" * 11)
    out += skipped_lines(data)
    return "\n".join(out) + "\n"


def _default_stem(data: dict) -> str:
    mi = data.get("machine_info", {})
    dev = "cuda" if mi.get("cuda_available") else "cpu"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"fake_quant-{dev}-{stamp}"


def suite_results(json_arg, json_out, json_name, run, options):
    """(rc, data, json_path, tmpdir): the pytest-benchmark JSON given as json_arg, or the one
    `run(json_path)` writes (into json_out, else a temp dir the caller removes). data is None
    when the run wrote nothing."""
    if json_arg:
        path = Path(json_arg)
        return 0, json.loads(path.read_text()), path, None
    tmpdir = None
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        tmpdir = tempfile.mkdtemp(prefix="oqfl-bench-")
        path = Path(tmpdir) / json_name
    rc = run(path)
    if not path.exists():
        print(f"pytest exited with {rc} and wrote no JSON", file=sys.stderr)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return rc or 1, None, path, None
    data = json.loads(path.read_text())
    data["_report_options"] = options
    return rc, data, path, tmpdir


def publish(text: str, data: dict, rc: int, save, stem: str, json_path: Path) -> None:
    """Print the report (with a warning when pytest failed) and, when `save` is not None, write
    bench/results/<stem>.md and .json."""
    if rc:
        text += f"\n**Warning:** pytest exited with status {rc}; see its output above.\n"
    print(text)
    if save is None:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"{stem}.md"
    md.write_text(text)
    js = RESULTS_DIR / f"{stem}.json"
    if json_path.resolve() != js.resolve():
        js.write_text(json.dumps(data, indent=1))
    print(f"saved {md.relative_to(ROOT)} and {js.relative_to(ROOT)}", file=sys.stderr)


def report_main(argv, *, doc: str, suite: Path, render, default_stem, min_rounds: int,
                max_time: float, keyword: str | None = None) -> int:
    """The command line every report shares: run `suite` (or read a JSON given as argument),
    print `render(data)` and, with --save, publish it as bench/results/NAME.md (+ .json), NAME
    defaulting to `default_stem(data)`. `keyword` is the default pytest -k expression."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("json", nargs="?", help="existing pytest-benchmark JSON to summarize "
                   "(default: run the suite)")
    p.add_argument("--save", nargs="?", const="", default=None, metavar="NAME",
                   help="also write bench/results/NAME.md and NAME.json (default NAME: "
                        "the report's own, see its docstring)")
    p.add_argument("--json-out", help="where the suite's JSON goes (default: a temp file)")
    p.add_argument("-k", dest="keyword", default=keyword,
                   help="pytest -k expression to run a subset")
    p.add_argument("--min-rounds", type=int, default=min_rounds)
    p.add_argument("--max-time", type=float, default=max_time)
    args = p.parse_args(argv)

    rc, data, json_path, tmpdir = suite_results(
        args.json, args.json_out, suite.stem + ".json",
        lambda path: run_suite(path, args.min_rounds, args.max_time, args.keyword, suite),
        {"min_rounds": args.min_rounds, "max_time": args.max_time})
    if data is None:
        return rc
    publish(render(data), data, rc, args.save, args.save or default_stem(data), json_path)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return rc


def main(argv=None) -> int:
    return report_main(argv, doc=__doc__, suite=SUITE, render=render, default_stem=_default_stem,
                       min_rounds=DEFAULT_MIN_ROUNDS, max_time=DEFAULT_MAX_TIME)


if __name__ == "__main__":
    sys.exit(main())
