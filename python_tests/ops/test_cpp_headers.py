"""Builds and runs the C++ unit tests of the torch-free headers (csrc/common) with CMake/ctest,
so the README's one test command covers them too."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                    reason="cmake/ctest not installed (scripts/setup.sh installs them)")
def test_ctest_common_headers(tmp_path):
    build = tmp_path / "cmake"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    steps = [
        ("cmake", "-S", ROOT, "-B", str(build), "-DOQFL_BUILD_EXTENSION=OFF"),
        ("cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)),
        ("ctest", "--test-dir", str(build), "--output-on-failure"),
    ]
    for cmd in steps:
        result = run(*cmd)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout
