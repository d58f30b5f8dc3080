"""scripts/device_check.sh (the GPU check) and its Python half bench/report_device.py, on a
machine without a GPU: the dry-run plan, the exit for no GPU, the CUDA test selection, and the
step machinery (timeouts, steps that do not run, the report) with a stand-in GPU and python."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check.sh"
REPORT_DEVICE = ROOT / "bench" / "report_device.py"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@needs_bash
def test_dry_run_prints_the_arch_only_build_and_the_test_and_bench_commands():
    before = sorted(os.listdir(ROOT / "bench" / "results"))
    r = _run(["bash", str(SCRIPT), "--dry-run"])
    assert r.returncode == 0, r.stderr
    plan = r.stdout
    # one architecture: the GPU's own capability, or the placeholder where none is visible
    arch = re.findall(r"TORCH_CUDA_ARCH_LIST=([^\s']+(?: capability>)?)", plan)
    assert len(arch) == 2, plan  # the build, and setup.sh's build where no CUDA torch is found
    assert all(re.fullmatch(r"\d+\.\d+|<compute capability>", a) for a in arch), arch
    assert f"MAX_JOBS={len(os.sched_getaffinity(0))}" in plan
    assert "-m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e ." in plan
    assert "bench/report_device.py verify --arch" in plan
    assert "bench/report_device.py tests --summary" in plan and "-- python_tests" in plan
    assert "bench/report.py -k cuda --json-out" in plan
    assert "bench/report_train_step.py -k cuda --json-out" in plan
    assert re.search(r"--out bench/results/device-[a-z0-9-]+-\d{4}-\d{2}-\d{2}\.md", plan)
    # every step has its timeout
    limits = [int(t) for t in re.findall(r"\(timeout (\d+)s\)", plan)]
    assert len(limits) == 8
    # nothing ran: no report appeared
    assert sorted(os.listdir(ROOT / "bench" / "results")) == before


@needs_bash
def test_without_a_gpu_it_exits_2_and_says_so():
    if shutil.which("nvidia-smi") or torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the script would run the check")
    r = _run(["bash", str(SCRIPT)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "no NVIDIA GPU found" in r.stderr
    assert "--dry-run" in r.stderr


@needs_bash
def test_unknown_argument_is_refused():
    r = _run(["bash", str(SCRIPT), "--fast"])
    assert r.returncode == 64
    assert "'--fast'" in r.stderr and "--dry-run" in r.stderr


SAMPLE_TESTS = '''
import pytest

gpu = pytest.mark.skipif(True, reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_param(device):
    pass


@gpu
def test_marked():
    pass


def test_skips_itself():
    if True:
        pytest.skip("no cuda generator")


@pytest.mark.parametrize("args", [["--device", "cuda:0"]])
def test_device_only_in_decorator(args):
    pass


@pytest.mark.parametrize("where", ["cpu"])
def test_cuda_named_but_cpu_param(where):
    pass


def test_plain():
    pass


def test_cuda_result():
    assert 1 + 1 == 3, "wrong sum"
'''


def test_a_module_that_does_not_import_is_an_error_not_a_stop(tmp_path):
    (tmp_path / "test_broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    summary = tmp_path / "s.json"
    r = _run([sys.executable, str(REPORT_DEVICE), "tests", "--summary", str(summary), "--", "."],
             cwd=tmp_path)
    assert r.returncode != 0
    s = json.loads(summary.read_text())
    assert s["errors"] == 1 and s["failures"][0]["when"] == "collect"
    assert "test_broken.py" in s["failures"][0]["test"]
    assert (s["selected"], s["reported"], s["failed"]) == (4, 4, 1)  # the others still ran


def test_tests_selects_the_cuda_tests_and_counts_outcomes(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    summary = tmp_path / "s.json"
    command = [sys.executable, str(REPORT_DEVICE), "tests", "--summary", str(summary), "--",
               "test_sample.py"]
    listed = _run(command + ["--collect-only"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert sorted(re.findall(r"test_sample\.py::(\S+)", listed.stdout)) == [
        "test_cuda_result", "test_marked", "test_param[cuda]", "test_skips_itself"]

    r = _run(command, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr  # the failing test
    s = json.loads(summary.read_text())
    assert (s["selected"], s["deselected"]) == (4, 4), r.stdout
    assert (s["reported"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (4, 0, 1, 0, 3)
    assert [f["test"] for f in s["failures"]] == ["test_sample.py::test_cuda_result"]
    assert "wrong sum" in s["failures"][0]["message"]
    assert s["failures"][0]["when"] == "call"
    assert s["skip_reasons"] == {"needs a CUDA GPU": 2, "no cuda generator": 1}
    assert s["finished"] and s["exit_status"] == 1


def _fake_machine(tmp_path):
    """A copy of the script and its Python files, a stand-in nvidia-smi naming a GPU, and a
    stand-in python that hangs in every step but the report (which it runs for real)."""
    tree = tmp_path / "tree"
    for rel in ("scripts/device_check.sh", "bench/report_device.py", "bench/report.py",
                "bench/report_train_step.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tree / rel)
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/bash\ncase "$*" in\n'
                   '  *compute_cap*) echo "Test GPU X1, 9.0" ;;\n'
                   '  *driver_version*) echo "Test GPU X1, 580.1, 1000 MiB" ;;\n'
                   '  *) echo "Driver Version: 580.1   CUDA Version: 13.0" ;;\nesac\n')
    py = fake / "py"
    py.write_text('#!/bin/bash\nif [ "$1 $2" = "bench/report_device.py report" ] || '
                  '[ "$1" = -c ]; then\n'
                  f'  exec {sys.executable} "$@"\nfi\nexec sleep 1000\n')
    smi.chmod(0o755)
    py.chmod(0o755)
    return tree, fake, py


@needs_bash
def test_a_step_past_its_timeout_is_recorded_and_the_report_still_written(tmp_path):
    tree, fake, py = _fake_machine(tmp_path)
    out = tmp_path / "out"
    # 40 s: 30 kept for the report, so the first step gets 10 s and the others none
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OQFL_PYTHON=str(py),
               OQFL_DEVICE_BUDGET="40", OQFL_COMMIT="0123abcd", OUT=str(out),
               TMPDIR=str(tmp_path))  # the work folder of logs goes there too
    r = _run(["bash", str(tree / "scripts" / "device_check.sh")], env=env)
    assert r.returncode == 1, r.stderr
    reports = list((tree / "bench" / "results").glob("device-test-gpu-x1-*.md"))
    assert len(reports) == 1, r.stderr
    text = reports[0].read_text()
    assert "compute capability 9.0" in text and "driver 580.1" in text
    assert "- commit: 0123abcd" in text
    assert re.search(r"\| probe \| timed out \| 124 \| \d+ \| (9|10) \|", text), text
    for name in ("build", "verify", "tests", "bench_fake_quant", "bench_train_step"):
        assert re.search(rf"\| {name} \| not run \(budget spent\) \|", text), name
    assert "TORCH_CUDA_ARCH_LIST=9.0" in text
    log = reports[0].name.replace("device-", "device-check-", 1)[:-3] + ".log"
    assert sorted(p.name for p in out.iterdir()) == sorted([reports[0].name, log])


def test_report_lists_steps_failures_and_missing_benchmarks(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report_device as rd
    finally:
        sys.path.remove(str(ROOT / "bench"))
    (tmp_path / "steps.tsv").write_text(
        "build\tok\t0\t95\t300\tenv TORCH_CUDA_ARCH_LIST=9.0 python -m pip install -e .\n"
        "tests\tfailed\t1\t70\t240\tpython bench/report_device.py tests | x\n"
        "malformed line\n")
    steps = rd.read_steps(tmp_path / "steps.tsv")
    assert [s["name"] for s in steps] == ["build", "tests"]
    summary = {"selected": 4, "deselected": 9, "reported": 3, "passed": 1, "failed": 1, "errors": 0,
               "skipped": 1, "xfailed": 0, "xpassed": 0, "finished": False, "exit_status": None,
               "failures": [{"test": "t.py::test_a[cuda]", "when": "call", "message": "boom"}],
               "skip_reasons": {"needs flwr": 1}}
    text = rd.render_report(
        gpu={"name": "G", "capability": "9.0", "driver": "580", "driver_cuda": "13.0"},
        env={"torch": "2.11.0", "torch_cuda": "13.0", "python": "3.12.3"},
        build={"with_cuda": True, "arch_list": "9.0", "problems": []}, steps=steps,
        summary=summary, benches=[rd.bench_section(tmp_path, "bench_x", "X bench", "report")],
        commit="c0ffee", python="python3", date="2026-01-02")
    assert "# Device check: G, 2026-01-02" in text
    assert "| build | ok | 0 | 95 | 300 |" in text
    assert "python bench/report_device.py tests \\| x" in text  # a | cannot break the table
    assert "Total wall time of the steps: 165 s." in text
    assert "passed 1, failed 1, errors 0, skipped 1" in text
    assert "**did not finish**" in text and "3 of 4 tests reported" in text
    assert "- `t.py::test_a[cuda]` (call): boom" in text
    assert "- 1 × needs flwr" in text
    assert "### X bench" in text and "No results" in text
