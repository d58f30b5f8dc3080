"""`pip install <repository>` as a user types it (docs/DESIGN.md section 6): a fresh virtual
environment, pip's build isolation (the build environment gets pyproject's pinned torch), no
option. The installed package must import from the venv (not from this checkout), require
exactly the torch it was built against, and compute what the float64 reference computes.

The copy that is installed is the checkout's tracked and untracked-but-not-ignored files (what a
clone plus local edits holds), so neither the in-place build (``_C*.so``, ``_build_info.py``,
``build/``) nor the venv leaks into the install, and the install writes nothing into this
checkout. It is built with ``OQFL_NO_CUDA=1`` to keep it short (the CUDA compile is checked by
the editable build of scripts/setup.sh); pip takes torch (twice: build environment and venv)
from its caches or indexes as configured on the machine.

Slow (several minutes: two torch installs and the CPU compile), so it runs only with
``OQFL_TEST_PIP_INSTALL=1``, which ``.ci/run`` sets; it prints its wall and CPU time.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import dyadic_x, pow2_scale
from reference import fake_quant_ref

ROOT = Path(__file__).resolve().parents[2]


def _pin(text: str, name: str) -> str:
    found = re.findall(rf'(?m)^\s*"?{name}==([^"\s,]+)', text)
    assert len(found) == 1, f"expected one {name}== pin, found {found}"
    return found[0]


def test_isolated_build_pins_the_projects_torch():
    """pyproject's build requirement is the torch requirements.txt pins (fast, always runs)."""
    build_requires = re.search(r"(?s)\[build-system\].*?requires\s*=\s*\[(.*?)\]",
                               (ROOT / "pyproject.toml").read_text()).group(1)
    build_torch = _pin(build_requires.replace(",", "\n"), "torch")
    assert build_torch == _pin((ROOT / "requirements.txt").read_text(), "torch")


def _copy_checkout(dest: Path) -> None:
    """The files a clone with local edits would have (tracked, plus untracked files that git
    does not ignore)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # a deleted tracked file is still listed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


# run inside the fresh venv: where the package comes from, its requirement on torch, and the
# op's outputs for the test to compare with the reference here
PROBE = r"""
import importlib.metadata as md, json, sys, torch
from safetensors.torch import load_file, save_file
import oqfl_ext, oqfl_ext._build_info as b
from oqfl_ext import ops
t = load_file(sys.argv[1])
y = ops.fake_quant(t["x"], t["scale"], t["zp"], quant_min=0, quant_max=15)
w = ops.fake_quant(t["w"], t["w_scale"], quant_min=-8, quant_max=7, axis=0)
packed = ops.quantize_pack(t["w"], t["w_scale"], bits=4, axis=0)
back = ops.unpack_dequantize(packed, t["w_scale"], bits=4, shape=list(t["w"].shape), axis=0)
save_file({"y": y, "w": w, "back": back}, sys.argv[2])
print(json.dumps({"file": oqfl_ext.__file__, "torch": torch.__version__,
                  "torch_dist": md.version("torch"),
                  "built_for": b.TORCH_VERSION, "with_cuda": b.WITH_CUDA,
                  "requires": md.requires("oqfl_ext"), "capability": ops.cpu_capability()}))
"""


@pytest.mark.skipif(os.environ.get("OQFL_TEST_PIP_INSTALL") != "1",
                    reason="slow (a fresh venv, two torch installs, a compile): set "
                           "OQFL_TEST_PIP_INSTALL=1 to run it (.ci/run does)")
def test_plain_pip_install_in_a_fresh_venv(tmp_path):
    from safetensors.torch import load_file, save_file

    src, venv = tmp_path / "src", tmp_path / "venv"
    _copy_checkout(src)
    assert not list(src.glob("oqfl_ext/_C*")) and not (src / "oqfl_ext/_build_info.py").exists()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = dict(os.environ, OQFL_NO_CUDA="1", MAX_JOBS=str(os.cpu_count() or 1))
    env.pop("PYTHONPATH", None)

    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    res = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check",
                          str(src)], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    wall, after = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"pip install: {wall:.0f} s wall, {cpu:.0f} s CPU (children), "
          f"{os.cpu_count()} CPUs, load average before {os.getloadavg()}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    # power-of-two steps and inputs on a 1/8 grid of x/s + z (ties included): every quantity
    # is exact in float32, so the op must equal the float64 reference bit for bit
    x_scale, zp = pow2_scale(1, "cpu"), torch.tensor([2.0])
    w_scale = pow2_scale(16, "cpu")
    inputs = {"x": dyadic_x((4, 8, 5, 5), x_scale, zp, 0, 15, torch.float32, "cpu"),
              "scale": x_scale, "zp": zp, "w_scale": w_scale,
              "w": dyadic_x((16, 8, 3, 3), w_scale, torch.zeros(16), -8, 7, torch.float32,
                            "cpu", axis=0)}
    save_file(inputs, tmp_path / "in.safetensors")
    probe = subprocess.run([str(py), "-c", PROBE, str(tmp_path / "in.safetensors"),
                            str(tmp_path / "out.safetensors")], env=env, capture_output=True,
                           text=True, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert probe.returncode == 0, probe.stderr[-4000:]
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(venv.resolve()), info["file"]
    assert info["built_for"] == info["torch"] and info["with_cuda"] is False
    # exactly the torch distribution it was built against (PyPI's 2.14.1 calls itself
    # 2.14.1+cu130 at run time)
    assert f"torch=={info['torch_dist']}" in info["requires"], info["requires"]
    assert info["torch"].split("+")[0] == info["torch_dist"].split("+")[0]
    assert {"numpy", "safetensors"} <= {re.split(r"[=<>;\[ ]", r)[0] for r in info["requires"]}

    out = load_file(tmp_path / "out.safetensors")
    x, s, z = inputs["x"], inputs["scale"], inputs["zp"]
    torch.testing.assert_close(out["y"], fake_quant_ref(x, s, z, quant_min=0, quant_max=15)
                               .float(), rtol=0, atol=0)
    want_w = fake_quant_ref(inputs["w"], inputs["w_scale"], quant_min=-8, quant_max=7,
                            axis=0).float()
    torch.testing.assert_close(out["w"], want_w, rtol=0, atol=0)
    torch.testing.assert_close(out["back"], want_w, rtol=0, atol=0)

    # the console script the package declares is installed and runs
    cli = subprocess.run([str(venv / "bin" / "oqfl-fl"), "--help"], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0 and "--uplink" in cli.stdout, cli.stderr[-2000:]
    print(f"installed: torch {info['torch']}, CPU path {info['capability']}, "
          f"requires {info['requires']}")
