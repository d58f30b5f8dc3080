"""Benchmarks for ``oqfl_ext.ops.fake_quant`` (LSQ fake quantization) against its baselines.

Every benchmark group is one (case, dtype, mode, device) and holds five implementations:

``oqfl``
    ``oqfl_ext.ops.fake_quant`` (skipped with the reason when the extension does not load).
``torch_builtin``
    ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``, the peer op
    (skipped with the reason where it rejects the dtype on the device).
``eager_lsq``
    The same LSQ math in plain PyTorch eager (:func:`lsq_fake_quant`).
``compiled_lsq``
    :func:`lsq_fake_quant` under ``torch.compile`` (compiled and warmed up before timing).
``copy``
    ``dst.copy_(src)`` of a tensor of ``x``'s size and dtype: the bandwidth reference.

Modes: ``fwd`` is the op on inputs that do not require grad; ``fwdbwd`` is ``y = op(...)`` then
``y.backward(grad)`` with ``x``, ``scale`` (and ``zero_point`` where the case has one) requiring
grad, a preallocated ``grad``, and every ``.grad`` set to None before each iteration (what
``optimizer.zero_grad()`` leaves). CUDA groups end the timed function with
``torch.cuda.synchronize()``. Default thread count and allocator throughout.

``bytes`` in each benchmark's extra_info is the minimal traffic of the op: fwd reads x and
writes y (2 * nbytes(x)); fwd+bwd adds reading grad and x and writing grad_x (5 * nbytes(x)).
The copy moves 2 * nbytes(x). ``bench/report.py`` turns these into ratios.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch._dynamo

# One compiled wrapper serves every (shape, dtype, device, grad mode): give each its own
# static-shape graph instead of falling back to eager after the default recompile limit.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)


# ----------------------------------------------------------------------------------------------
# The LSQ math in plain PyTorch: the eager and compiled baselines.
# ----------------------------------------------------------------------------------------------


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Value of ``t``, gradient of ``t`` times ``g`` (the LSQ paper's trick)."""
    return t * g + (t - t * g).detach()


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """round_half_to_even(v) in the forward pass, identity gradient (straight-through)."""
    return (v.round() - v).detach() + v


def lsq_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
    grad_factor: float,
) -> torch.Tensor:
    """LSQ fake quant written with ordinary PyTorch ops (docs/DESIGN.md section 2).

    v = x/s + z; q = clamp(round(v), qmin, qmax); y = (q - z)*s, computed in float32 and
    returned in x's dtype. Autograd through it gives: dx = dy in range, 0 outside;
    ds = dy*(q - v)*g in range, dy*(q - z)*g outside; dz = 0 in range, -dy*s*g outside,
    where "in range" is qmin <= round(v) <= qmax (bounds included).
    """
    s = _grad_scale(scale, grad_factor)
    z = _grad_scale(zero_point, grad_factor) if zero_point is not None else None
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.view(shape)
        z = z.view(shape) if z is not None else None
    xf = x.to(torch.float32)
    v = xf / s
    if z is not None:
        v = v + z
    # Not torch.clamp's own gradient: it is 0 for values exactly on a bound (0.5 with tensor
    # bounds), while the contract counts qmin/qmax as in range. round() has a zero gradient,
    # so the clamped branch carries none.
    r = v.round()
    in_range = (r >= quant_min) & (r <= quant_max)
    q = torch.where(in_range, _round_ste(v), r.clamp(quant_min, quant_max))
    if z is not None:
        q = q - z
    return (q * s).to(x.dtype)


compiled_lsq_fake_quant = torch.compile(lsq_fake_quant, dynamic=False, fullgraph=True)


def lsq_grad_factor(elements_per_step: int, quant_max: int) -> float:
    """1 / sqrt(N_s * qmax) (same formula as oqfl_ext.ops.lsq_grad_factor, kept local so the
    baselines run without the extension)."""
    return 1.0 / math.sqrt(elements_per_step * quant_max)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    quant_min: int
    quant_max: int
    axis: Optional[int]
    zero_point: Optional[float]  # None: no offset (ours gets None, PyTorch's op gets zeros)


CASES = {
    # ResNet-style activation after a 3x3 conv at 56x56, 4-bit unsigned with a learned offset
    # (integer valued, so PyTorch's op computes the same thing).
    "act-per-tensor": Case("act-per-tensor", (32, 64, 56, 56), 0, 15, None, 8.0),
    # 3x3 conv weight of a 256-channel layer, 4-bit signed, one step size per output channel.
    "weight-per-channel": Case("weight-per-channel", (256, 256, 3, 3), -8, 7, 0, None),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")
DEVICES = ("cpu", "cuda")
IMPLS = ("oqfl", "torch_builtin", "eager_lsq", "compiled_lsq", "copy")

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def group_name(case: str, dtype: str, mode: str, device: str) -> str:
    return f"{case}-{dtype}-{mode}-{device}"


def _elements_per_step(case: Case) -> int:
    n = math.prod(case.shape)
    return n if case.axis is None else n // case.shape[case.axis]


@functools.lru_cache(maxsize=None)
def _data(case_name: str, dtype_name: str, device: str):
    """x, scale, zero_point (or None), grad for a case; created once, shared read-only."""
    case = CASES[case_name]
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(1234)
    x32 = torch.randn(case.shape, generator=gen)
    # LSQ's initial step size 2 * mean|x| / sqrt(qmax), per tensor or per channel.
    if case.axis is None:
        scale = (2 * x32.abs().mean() / math.sqrt(case.quant_max)).reshape(1)
    else:
        dims = [d for d in range(x32.dim()) if d != case.axis]
        scale = 2 * x32.abs().mean(dim=dims) / math.sqrt(case.quant_max)
    zp = None if case.zero_point is None else torch.full_like(scale, case.zero_point)
    grad = torch.randn(case.shape, generator=gen)
    x = x32.to(device=device, dtype=dtype).contiguous()
    grad = grad.to(device=device, dtype=dtype).contiguous()
    scale = scale.to(device).contiguous()
    zp = zp.to(device) if zp is not None else None
    return x, scale, zp, grad


# ----------------------------------------------------------------------------------------------
# Availability probes (skip, with the reason, instead of failing the whole group)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _oqfl_ops():
    """(ops module, None) when oqfl_ext loads and its CPU op runs, else (None, reason)."""
    try:
        import oqfl_ext  # noqa: F401
        from oqfl_ext import ops

        ops.fake_quant(torch.zeros(4), torch.ones(1), quant_min=0, quant_max=15)
        return ops, None
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return None, f"oqfl_ext is not usable ({msg})"


def _oqfl_skip_reason(device: str) -> Optional[str]:
    ops, reason = _oqfl_ops()
    if ops is None:
        return reason
    if device == "cuda":
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key("oqfl::fake_quant", "CUDA")
        except Exception:
            has = False
        if not has:
            return "oqfl_ext was built without CUDA kernels (no CUDA kernel for oqfl::fake_quant)"
    return None


def _builtin_call(x, scale, zp, case: Case, g: float):
    if zp is None:  # PyTorch's ops always take an offset: give zeros
        zp = torch.zeros_like(scale)
    if case.axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zp, case.quant_min, case.quant_max, g)
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zp, case.axis, case.quant_min, case.quant_max, g)


@functools.lru_cache(maxsize=None)
def _builtin_skip_reason(case_name: str, dtype_name: str, mode: str, device: str) -> Optional[str]:
    """Run PyTorch's op on a small tensor of the same dtype/device/mode; None when it works."""
    case = CASES[case_name]
    dtype = DTYPES[dtype_name]
    grad = mode == "fwdbwd"
    small = list(case.shape)
    small[0] = min(small[0], 4)
    small = [min(d, 8) for d in small]
    x = torch.randn(small, device=device).to(dtype).requires_grad_(grad)
    n_s = 1 if case.axis is None else small[case.axis]
    scale = torch.full((n_s,), 0.25, device=device, requires_grad=grad)
    zp = None if case.zero_point is None else torch.full(
        (n_s,), case.zero_point, device=device, requires_grad=grad)
    try:
        y = _builtin_call(x, scale, zp, case, 1.0)
        if grad:
            y.backward(torch.ones_like(y))
        if y.dtype != dtype:
            return f"torch builtin returns {y.dtype} for {dtype} input on {device}"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        what = "forward" if not grad else "forward+backward"
        return f"torch builtin does not support {dtype} {what} on {device} ({msg})"
    return None


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def _params():
    out = []
    for device in DEVICES:
        marks = [_NO_CUDA] if device == "cuda" else []
        for case in CASES:
            for dtype in DTYPES:
                for mode in MODES:
                    for impl in IMPLS:
                        out.append(pytest.param(
                            case, dtype, mode, device, impl, marks=marks,
                            id=f"{group_name(case, dtype, mode, device)}-{impl}"))
    return out


def _make_callable(impl: str, case: Case, x, scale, zp, g: float):
    """The forward call of one implementation, closed over its inputs."""
    if impl == "oqfl":
        ops, _ = _oqfl_ops()
        return lambda: ops.fake_quant(
            x, scale, zp, quant_min=case.quant_min, quant_max=case.quant_max,
            axis=case.axis, grad_factor=g)
    if impl == "torch_builtin":
        zp_b = zp if zp is not None else torch.zeros_like(scale)  # built once, outside the timing
        return lambda: _builtin_call(x, scale, zp_b, case, g)
    if impl == "eager_lsq":
        return lambda: lsq_fake_quant(x, scale, zp, case.quant_min, case.quant_max, case.axis, g)
    if impl == "compiled_lsq":
        return lambda: compiled_lsq_fake_quant(
            x, scale, zp, case.quant_min, case.quant_max, case.axis, g)
    raise ValueError(impl)


@pytest.mark.parametrize("case_name,dtype_name,mode,device,impl", _params())
def test_fake_quant(benchmark, case_name, dtype_name, mode, device, impl):
    case = CASES[case_name]
    benchmark.group = group_name(case_name, dtype_name, mode, device)

    if impl == "oqfl":
        reason = _oqfl_skip_reason(device)
        if reason:
            pytest.skip(reason)
    elif impl == "torch_builtin":
        reason = _builtin_skip_reason(case_name, dtype_name, mode, device)
        if reason:
            pytest.skip(reason)

    x0, scale0, zp0, grad = _data(case_name, dtype_name, device)
    nbytes = x0.numel() * x0.element_size()
    op_bytes = 2 * nbytes if mode == "fwd" else 5 * nbytes
    g = lsq_grad_factor(_elements_per_step(case), case.quant_max)
    sync = torch.cuda.synchronize if device == "cuda" else None

    benchmark.extra_info.update({
        "impl": impl,
        "case": case_name,
        "dtype": dtype_name,
        "mode": mode,
        "device": device,
        "shape": list(case.shape),
        "numel": x0.numel(),
        "element_size": x0.element_size(),
        "bytes": 2 * nbytes if impl == "copy" else op_bytes,
        "op_bytes": op_bytes,
        "copy_bytes": 2 * nbytes,
        "torch_num_threads": torch.get_num_threads(),
        "grad_factor": g,
    })

    if impl == "copy":
        dst = torch.empty_like(x0)

        def run():
            dst.copy_(x0)
            if sync:
                sync()
    else:
        train = mode == "fwdbwd"
        # Fresh leaves sharing the cached storage, so .grad lands on tensors of this test only.
        x = x0.detach().requires_grad_(train)
        scale = scale0.detach().requires_grad_(train)
        zp = zp0.detach().requires_grad_(train) if zp0 is not None else None
        leaves = [t for t in (x, scale, zp) if t is not None]
        fwd = _make_callable(impl, case, x, scale, zp, g)

        if train:
            def run():
                for t in leaves:
                    t.grad = None
                fwd().backward(grad)
                if sync:
                    sync()
        else:
            def run():
                fwd()
                if sync:
                    sync()

    # torch.compile compiles here (forward and, on the first backward, the backward graph);
    # the other implementations get one untimed call so first-touch costs stay out too.
    # (With --benchmark-disable the single call below does the compiling.)
    if not benchmark.disabled:
        run()
        if impl == "compiled_lsq":
            run()

    benchmark(run)


# ----------------------------------------------------------------------------------------------
# The baselines must compute the same thing as the peer op (and as ours when it loads), or the
# ratios mean nothing. Small shapes, power-of-two step sizes so x/s is exact.
# ----------------------------------------------------------------------------------------------


def _small_inputs(case: Case, device: str = "cpu"):
    gen = torch.Generator().manual_seed(7)
    shape = (6, 5, 4, 3)
    x = torch.randn(shape, generator=gen) * 2.5
    c = 1 if case.axis is None else shape[case.axis]
    scale = torch.tensor([0.25, 0.5, 0.125, 1.0, 0.0625, 0.25][:c])
    zp = None if case.zero_point is None else torch.full((c,), case.zero_point)
    dy = torch.randn(shape, generator=gen)
    return x.to(device), scale.to(device), None if zp is None else zp.to(device), dy.to(device)


def _grads(fn, x, scale, zp, dy):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zp = zp.clone().requires_grad_(True) if zp is not None else None
    y = fn(x, scale, zp)
    y.backward(dy)
    return y.detach(), x.grad, scale.grad, (zp.grad if zp is not None else None)


def _assert_same(a, b, what):
    ya, gxa, gsa, gza = a
    yb, gxb, gsb, gzb = b
    torch.testing.assert_close(ya, yb, rtol=0, atol=0, msg=f"{what}: y differs")
    torch.testing.assert_close(gxa, gxb, rtol=0, atol=0, msg=f"{what}: grad x differs")
    torch.testing.assert_close(gsa, gsb, rtol=1e-4, atol=1e-6, msg=f"{what}: grad scale differs")
    if gza is not None and gzb is not None:
        torch.testing.assert_close(gza, gzb, rtol=1e-4, atol=1e-6, msg=f"{what}: grad zp differs")


@pytest.mark.parametrize("case_name", list(CASES))
def test_eager_lsq_matches_builtin(case_name):
    case = CASES[case_name]
    x, scale, zp, dy = _small_inputs(case)
    g = 0.3

    def eager(x, s, z):
        return lsq_fake_quant(x, s, z, case.quant_min, case.quant_max, case.axis, g)

    def builtin(x, s, z):
        return _builtin_call(x, s, z, case, g)

    _assert_same(_grads(eager, x, scale, zp, dy), _grads(builtin, x, scale, zp, dy),
                 f"eager_lsq vs torch builtin ({case_name})")


@pytest.mark.parametrize("case_name", list(CASES))
def test_oqfl_matches_eager_lsq(case_name):
    reason = _oqfl_skip_reason("cpu")
    if reason:
        pytest.skip(reason)
    ops, _ = _oqfl_ops()
    case = CASES[case_name]
    x, scale, zp, dy = _small_inputs(case)
    g = 0.3

    def eager(x, s, z):
        return lsq_fake_quant(x, s, z, case.quant_min, case.quant_max, case.axis, g)

    def ours(x, s, z):
        return ops.fake_quant(x, s, z, quant_min=case.quant_min, quant_max=case.quant_max,
                              axis=case.axis, grad_factor=g)

    _assert_same(_grads(ours, x, scale, zp, dy), _grads(eager, x, scale, zp, dy),
                 f"oqfl vs eager_lsq ({case_name})")
