"""Shared setup for the pytest-benchmark suites in bench/.

* Makes the repository root importable (appended, so an installed ``oqfl_ext`` still wins),
  so ``pytest bench`` works as well as ``python -m pytest bench``.
* Adds what the numbers depend on to the pytest header and to the benchmark JSON's
  ``machine_info`` (torch version and thread count, CPU model, CUDA device, oqfl_ext status).
* Records skipped tests with their reasons in the JSON (``"skipped"``), so a report made
  later from the JSON can still say why a column is empty.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

_SKIPPED: list = []


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


# Taken when pytest loads this file, before any benchmark runs: a high value means something
# else was using the CPU and the timings are suspect.
_LOADAVG_AT_START = _loadavg()


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def oqfl_status() -> dict:
    """Whether oqfl_ext imports and runs its CPU fake_quant, with the reason when it does not."""
    info: dict = {}
    try:
        import oqfl_ext  # noqa: F401
        from oqfl_ext import ops

        ops.fake_quant(torch.zeros(4), torch.ones(1), quant_min=0, quant_max=15)
        info["oqfl_available"] = True
        try:
            info["oqfl_cpu_capability"] = ops.cpu_capability()
        except Exception as e:  # pragma: no cover - informational only
            info["oqfl_cpu_capability"] = f"unknown ({type(e).__name__})"
        try:
            info["oqfl_has_cuda_kernel"] = bool(
                torch._C._dispatch_has_kernel_for_dispatch_key("oqfl::fake_quant", "CUDA")
            )
        except Exception:  # pragma: no cover
            info["oqfl_has_cuda_kernel"] = False
    except Exception as e:
        info["oqfl_available"] = False
        info["oqfl_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return info


def torch_machine_info() -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
        "loadavg_at_start": _LOADAVG_AT_START,
        "loadavg_at_end": _loadavg(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_runtime"] = torch.version.cuda
    info.update(oqfl_status())
    return info


def pytest_report_header(config):
    info = torch_machine_info()
    line = (
        f"torch {info['torch_version']}, threads={info['torch_num_threads']}, "
        f"cpu={info['cpu_model']} ({info['torch_cpu_capability']}), "
        f"cuda={info.get('cuda_device', 'none')}"
    )
    if info["oqfl_available"]:
        oq = f"oqfl_ext: available (cpu path {info.get('oqfl_cpu_capability')}, " \
             f"cuda kernel {info.get('oqfl_has_cuda_kernel')})"
    else:
        oq = f"oqfl_ext: NOT available, its benchmarks are skipped ({info['oqfl_error']})"
    return [line, oq]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(torch_machine_info())


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = ""
        if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            reason = str(report.longrepr[2])
        elif report.longrepr is not None:
            reason = str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPPED.append({"nodeid": report.nodeid, "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
