#!/usr/bin/env python
"""The Python half of scripts/device_check.sh (the GPU check): probe, verify, tests, report.

    python bench/report_device.py probe  --out env.json      # torch, CUDA and GPU facts
    python bench/report_device.py verify --arch 9.0 --out build.json
                                         # the built extension has CUDA kernels for that arch
    python bench/report_device.py tests  --summary tests.json [PYTEST ARGS...]
                                         # the CUDA tests of python_tests/ (selection below)
    python bench/report_device.py report --work DIR --out FILE.md [...]
                                         # the markdown report from what the steps left in DIR

`tests` selects the tests that exercise CUDA, with no marker of their own to rely on: a test is
selected when its parameter id names cuda (the `device` / `plain_device` fixtures' `cuda`
parameter, `cuda:99`), when it carries a skip/skipif mark whose reason names CUDA
(`conftest.requires_cuda` and the like), or when its name or body mentions cuda and none of its
parameters names cpu (tests that skip themselves inside the body). On a machine without a GPU the
selected tests are all skipped. The summary JSON is rewritten after every test, so a run killed by
its timeout still leaves the counts so far.

`report` only reads files the other steps wrote (JSON and the benchmark reports' pytest-benchmark
JSON, rendered by their own report scripts), so it runs even when torch is broken.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

# (step name in the steps file, title, report module): the CUDA benchmark suites the script runs
BENCHES = (
    ("bench_fake_quant", "fake_quant (bench/report.py -k cuda)", "report"),
    ("bench_train_step", "ResNet-20 training step (bench/report_train_step.py -k cuda)",
     "report_train_step"),
)

_CUDA = re.compile(r"cuda", re.IGNORECASE)
_CPU = re.compile(r"(^|[^a-z])cpu([^a-z]|$)", re.IGNORECASE)


# ------------------------------------------------------------------ selection of the CUDA tests

def _param_id(item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else ""


def _skip_reasons(item):
    for mark in item.iter_markers():
        if mark.name in ("skip", "skipif"):
            reason = mark.kwargs.get("reason")
            if reason is None and mark.name == "skip" and mark.args:
                reason = mark.args[0]
            if isinstance(reason, str):
                yield reason


def _body_mentions_cuda(item) -> bool:
    func = getattr(item, "function", None)
    if func is None:
        return False
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    # the body only: a decorator's parameter list may name cuda for a CPU-only check
    body = re.split(r"^\s*(?:async\s+)?def\s", source, maxsplit=1, flags=re.MULTILINE)[-1]
    return bool(_CUDA.search(body))


def is_cuda_test(item) -> bool:
    """Whether a collected pytest item exercises CUDA (the rule in the module docstring)."""
    param = _param_id(item)
    if _CUDA.search(param):
        return True
    if any(_CUDA.search(r) for r in _skip_reasons(item)):
        return True
    if _CPU.search(param):
        return False
    return bool(_CUDA.search(getattr(item, "originalname", item.name))) or _body_mentions_cuda(item)


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""


class CudaTests:
    """pytest plugin: keeps only the CUDA tests and writes the outcome counts to a JSON file."""

    def __init__(self, summary: Path):
        self.summary_path = summary
        self.summary = {"selected": 0, "deselected": 0, "reported": 0, "passed": 0, "failed": 0,
                        "errors": 0,
                        "skipped": 0, "xfailed": 0, "xpassed": 0, "failures": [],
                        "skip_reasons": {}, "finished": False, "exit_status": None}
        self._write()

    def _write(self):
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1))
        os.replace(tmp, self.summary_path)

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if is_cuda_test(i)]
        drop = [i for i in items if not is_cuda_test(i)]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep
        self.summary["selected"] = len(keep)
        self.summary["deselected"] = len(drop)
        self._write()

    def pytest_collectreport(self, report):
        # a test module that does not import here (a missing package): its tests count as errors
        if report.failed:
            self.summary["errors"] += 1
            self.summary["failures"].append({"test": report.nodeid, "when": "collect",
                                             "message": _first_line(str(report.longrepr))})
            self._write()

    def pytest_runtest_logreport(self, report):
        s = self.summary
        if report.when == "call" or (report.when == "setup" and not report.passed):
            s["reported"] += 1  # a test is over once it ran, or once its setup skipped / failed
        if report.passed:
            if report.when == "call":
                s["xpassed" if hasattr(report, "wasxfail") else "passed"] += 1
        elif report.skipped:
            if hasattr(report, "wasxfail"):
                s["xfailed"] += 1
            else:
                s["skipped"] += 1
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
                    report.longrepr)
                reason = reason.removeprefix("Skipped: ")
                s["skip_reasons"][reason] = s["skip_reasons"].get(reason, 0) + 1
        else:  # failed: in the test itself, or an error in its setup / teardown
            s["failed" if report.when == "call" else "errors"] += 1
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            s["failures"].append({"test": report.nodeid, "when": report.when,
                                  "message": _first_line(message)})
        self._write()

    def pytest_sessionfinish(self, session, exitstatus):
        self.summary["finished"] = True
        self.summary["exit_status"] = int(exitstatus)
        self._write()


def cmd_tests(args) -> int:
    import pytest

    plugin = CudaTests(Path(args.summary))
    pytest_args = args.pytest_args or ["python_tests"]
    # one test module that fails to import must not stop the others from running
    rc = pytest.main(["-p", "no:cacheprovider", "-q", "-rfEs", "--continue-on-collection-errors",
                      *pytest_args], plugins=[plugin])
    if plugin.summary["selected"] == 0:
        print("device_check: no CUDA test was selected", file=sys.stderr)
        return 1
    return int(rc)


# ------------------------------------------------------------------ probe and verify

def cmd_probe(args) -> int:
    import torch

    info = {"python": sys.version.split()[0], "python_executable": sys.executable,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    if not info["cuda_available"]:
        print("device_check: torch.cuda.is_available() is False", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args) -> int:
    import torch

    problems = []
    info = {"cuda_available": torch.cuda.is_available()}
    if not info["cuda_available"]:
        problems.append("torch.cuda.is_available() is False")
    try:
        import oqfl_ext  # noqa: F401  (refuses a missing or stale build with the command to run)
        import oqfl_ext._build_info as build
        from oqfl_ext import ops
    except Exception as e:  # the report needs the reason, whatever it is
        problems.append(f"import oqfl_ext failed: {type(e).__name__}: {e}")
    else:
        info.update(with_cuda=build.WITH_CUDA, cuda_version=build.CUDA_VERSION,
                    arch_list=build.CUDA_ARCH_LIST, built_torch=build.TORCH_VERSION)
        info["cuda_kernel_registered"] = bool(
            torch._C._dispatch_has_kernel_for_dispatch_key("oqfl::fake_quant", "CUDA"))
        if not build.WITH_CUDA:
            problems.append("oqfl_ext._build_info.WITH_CUDA is False (built without CUDA kernels)")
        if args.arch and build.CUDA_ARCH_LIST != args.arch:
            problems.append(f"built for TORCH_CUDA_ARCH_LIST={build.CUDA_ARCH_LIST!r}, "
                            f"expected {args.arch!r}")
        if not info["cuda_kernel_registered"]:
            problems.append("oqfl::fake_quant has no CUDA kernel registered")
        if not problems:
            # one launch: the kernel image loads on this GPU (an arch mismatch fails here)
            x = torch.linspace(-2, 2, 64)  # made on the CPU: both kernels see the same values
            scale = torch.tensor([0.25])
            ref = ops.fake_quant(x, scale, quant_min=-8, quant_max=7)
            y = ops.fake_quant(x.cuda(), scale.cuda(), quant_min=-8, quant_max=7)
            info["smoke_matches_cpu"] = bool(torch.equal(y.cpu(), ref))
            if not info["smoke_matches_cpu"]:
                problems.append("fake_quant on CUDA differs from the CPU kernel on a smoke input")
    info["problems"] = problems
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    for p in problems:
        print(f"device_check: {p}", file=sys.stderr)
    return 1 if problems else 0


# ------------------------------------------------------------------ the report

def read_steps(path: Path) -> list[dict]:
    """The steps file the shell script writes: one tab-separated line per step,
    name, status, exit code, seconds, limit in seconds, command."""
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 6:
            continue
        name, status, rc, secs, limit, command = parts
        steps.append({"name": name, "status": status, "rc": rc, "seconds": secs,
                      "limit": limit, "command": command})
    return steps


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _nvidia_smi() -> dict:
    info = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
        name, driver, memory = (f.strip() for f in out.splitlines()[0].split(","))
        info.update(name=name, driver=driver, memory=memory)
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", head)
        if m:
            info["driver_cuda"] = m.group(1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return info


def tests_lines(summary) -> list[str]:
    if summary is None:
        return ["Not run, or it wrote no summary (see the steps table and the log)."]
    s = summary
    lines = [f"- selected: {s['selected']} CUDA tests ({s['deselected']} others deselected)",
             f"- passed {s['passed']}, failed {s['failed']}, errors {s['errors']}, "
             f"skipped {s['skipped']}, xfailed {s['xfailed']}, xpassed {s['xpassed']}"]
    if not s["finished"]:
        lines.append(f"- **did not finish** (killed by its timeout?): {s['reported']} of "
                     f"{s['selected']} tests reported")
    if s["failures"]:
        lines += ["", "Failures:"]
        lines += [f"- `{f['test']}` ({f['when']}): {f['message']}" for f in s["failures"]]
    if s["skip_reasons"]:
        lines += ["", "Skipped:"]
        lines += [f"- {n} × {reason}" for reason, n in s["skip_reasons"].items()]
    return lines


def bench_section(work: Path, step: str, title: str, module: str) -> list[str]:
    data = _read_json(work / f"{step}.json")
    if data is None:
        return [f"### {title}", "", "No results (see the steps table and the log).", ""]
    render = __import__(module).render
    text = render(data)
    # the rendered report starts with its own level-2 title: one level down inside this report
    text = re.sub(r"^## ", "#### ", text, flags=re.MULTILINE)
    return [f"### {title}", "", text.rstrip(), ""]


def render_report(*, gpu: dict, env, build, steps: list[dict], summary, benches: list[list[str]],
                  commit: str, python: str, date: str) -> str:
    env = env or {}
    build = build or {}
    out = [f"# Device check: {gpu.get('name') or env.get('device') or 'unknown GPU'}, {date}", "",
           "Written by `scripts/device_check.sh`.", ""]
    out += [
        f"- GPU: {gpu.get('name') or env.get('device', '?')}, compute capability "
        f"{gpu.get('capability') or env.get('capability', '?')}, "
        f"{gpu.get('memory') or str(env.get('memory_gib', '?')) + ' GiB'}"
        + (f", {env['multiprocessors']} SMs" if env.get("multiprocessors") else ""),
        f"- driver {gpu.get('driver', '?')} (CUDA {gpu.get('driver_cuda', '?')} driver API)",
        f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), Python "
        f"{env.get('python', '?')} ({python})",
        f"- oqfl_ext build: WITH_CUDA={build.get('with_cuda', '?')}, "
        f"TORCH_CUDA_ARCH_LIST={build.get('arch_list', '?')!s}, CUDA kernel registered: "
        f"{build.get('cuda_kernel_registered', '?')}, smoke launch matches CPU: "
        f"{build.get('smoke_matches_cpu', '?')}",
        f"- commit: {commit}",
    ]
    for p in build.get("problems") or []:
        out.append(f"- **build problem:** {p}")
    out += ["", "## Steps", "", "| step | status | exit | wall s | limit s | command |",
            "|---|---|---:|---:|---:|---|"]
    for s in steps:
        command = s["command"].replace("|", "\\|")
        out.append(f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['limit']} "
                   f"| `{command}` |")
    total = sum(float(s["seconds"]) for s in steps if re.fullmatch(r"[\d.]+", s["seconds"]))
    out += ["", f"Total wall time of the steps: {total:.0f} s.", "", "## CUDA tests", ""]
    out += tests_lines(summary)
    out += ["", "## CUDA benchmarks", ""]
    for section in benches:
        out += section
    return "\n".join(out).rstrip() + "\n"


def cmd_report(args) -> int:
    work = Path(args.work)
    gpu = _nvidia_smi()
    if args.capability:
        gpu["capability"] = args.capability
    if args.gpu_name and "name" not in gpu:
        gpu["name"] = args.gpu_name
    benches = [bench_section(work, step, title, module) for step, title, module in BENCHES]
    text = render_report(
        gpu=gpu, env=_read_json(work / "env.json"), build=_read_json(work / "build.json"),
        steps=read_steps(work / "steps.tsv"), summary=_read_json(work / "tests.json"),
        benches=benches, commit=args.commit, python=args.python,
        date=args.date or _dt.date.today().isoformat())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="torch / CUDA / GPU facts as JSON")
    pr.add_argument("--out", required=True)
    ve = sub.add_parser("verify", help="check the built extension's CUDA kernels")
    ve.add_argument("--out", required=True)
    ve.add_argument("--arch", help="the TORCH_CUDA_ARCH_LIST the build must have used")
    te = sub.add_parser("tests", help="run the CUDA tests of python_tests/")
    te.add_argument("--summary", required=True, help="where the outcome counts go (JSON)")
    te.add_argument("pytest_args", nargs=argparse.REMAINDER,
                    help="pytest arguments (default: python_tests); put them after --")
    re_ = sub.add_parser("report", help="write the markdown report")
    re_.add_argument("--work", required=True, help="the folder the steps wrote into")
    re_.add_argument("--out", required=True, help="the report's path (.md)")
    re_.add_argument("--commit", default="unknown")
    re_.add_argument("--python", default="?", help="the interpreter the steps ran")
    re_.add_argument("--capability", default="")
    re_.add_argument("--gpu-name", default="")
    re_.add_argument("--date", default="")
    args = p.parse_args(argv)
    if args.cmd == "tests" and args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    return {"probe": cmd_probe, "verify": cmd_verify, "tests": cmd_tests,
            "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
