"""Shared fixtures: devices (CUDA skipped, never dropped, without a GPU), CPU SIMD paths, seeds."""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

# tests import their siblings (reference, helpers) whatever pytest's import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

CAPABILITIES = ("amx", "avx512", "avx2", "default")

# every numeric kernel test runs once per CPU code path and once on CUDA
BACKENDS = [pytest.param(("cpu", c), id=f"cpu-{c}") for c in CAPABILITIES] + [
    pytest.param(("cuda", None), id="cuda", marks=requires_cuda)
]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _ops():
    # imported lazily so that test_reference.py runs without a built extension
    import oqfl_ext  # noqa: F401  (a missing or stale build fails loudly here)

    return torch.ops.oqfl


def supported_capabilities():
    """The CPU code paths this machine can run (probed, then restored)."""
    ops = _ops()
    prev = ops._cpu_capability()
    ok = []
    try:
        for name in CAPABILITIES:
            try:
                ops._set_cpu_capability(name)
            except ValueError:
                continue
            ok.append(name)
    finally:
        ops._set_cpu_capability(prev)
    return ok


@pytest.fixture
def use_capability():
    """Callable fixture: switch the CPU path for this test; the previous one comes back after."""
    ops = _ops()
    prev = ops._cpu_capability()

    def switch(name):
        try:
            ops._set_cpu_capability(name)
        except ValueError as e:
            pytest.skip(f"CPU lacks the {name} path: {e}")

    yield switch
    ops._set_cpu_capability(prev)


@pytest.fixture(params=BACKENDS)
def device(request, use_capability):
    """A device string; on CPU the SIMD path of the parameter is active during the test."""
    dev, cap = request.param
    _ops()
    if cap is not None:
        use_capability(cap)
    return dev


@pytest.fixture(params=DEVICES)
def plain_device(request):
    """A device string without touching the CPU path (checks that do not depend on it)."""
    _ops()
    return request.param


@pytest.fixture(params=CAPABILITIES)
def capability(request, use_capability):
    use_capability(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # a fixed seed per test: reproducible, yet different data in different tests
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
