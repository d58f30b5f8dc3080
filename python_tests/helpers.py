"""Input builders and comparison helpers shared by the tests."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from typing import Optional

import torch
from safetensors.torch import load as st_load, save as st_save
from torch import Tensor

import reference as ref

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bit_range(bits: int, signed: bool):
    """(quant_min, quant_max) of a ``bits``-bit integer code."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def pow2_scale(shape, device, lo=-6, hi=1) -> Tensor:
    """Positive float32 step sizes that are powers of two, so x/s and (q-z)*s are exact."""
    e = torch.randint(lo, hi + 1, shape if isinstance(shape, tuple) else (shape,))
    return torch.pow(2.0, e.to(torch.float32)).to(device)


def int_zero_point(shape, qmin, qmax, device, even=False) -> Tensor:
    """float32 integer offsets inside [qmin, qmax].

    ``even``: offsets the peer op handles like the contract: even (half-to-even rounding is
    only invariant under even shifts, and the peer's forward adds z after rounding) and not
    negative (the peer's per-tensor backward truncates ``z + 0.5`` toward zero, so it uses
    -1 for z = -2).
    """
    shape = shape if isinstance(shape, tuple) else (shape,)
    if even:
        lo, hi = math.ceil(max(qmin, 0) / 2), math.floor(qmax / 2)
        z = 2 * torch.randint(lo, hi + 1, shape)
    else:
        z = torch.randint(qmin, qmax + 1, shape)
    return z.to(torch.float32).to(device)


def dyadic_x(shape, scale, zero_point, qmin, qmax, dtype, device, axis=None) -> Tensor:
    """x whose v = x/s + z lies on a 1/8 grid spanning [qmin-3, qmax+3].

    One element in eight sits exactly on a .5 tie; a few are pinned exactly on qmin/qmax, on the
    ties just outside them, and far outside the range. With power-of-two scales every quantity
    of the contract is then exact in float32, so kernels can be compared bit for bit.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    j = torch.randint((qmin - 3) * 8, (qmax + 3) * 8 + 1, shape)
    v = j.to(torch.float64) / 8
    if n:
        far = 16.0 * (qmax - qmin + 1)
        specials = torch.tensor([qmin, qmax, qmin - 0.5, qmax + 0.5, qmin + 0.5, qmax - 0.5,
                                 0.5, -0.5, 1.5, 2.5, -far, far], dtype=torch.float64)
        k = min(n, 3 * specials.numel())
        idx = torch.randperm(n)[:k]
        v.view(-1)[idx] = specials.repeat(3)[:k]
    xd = torch.empty(shape, dtype=torch.float64)  # only its dims matter here
    s = ref.param_view(scale, xd, axis).cpu()
    z = ref.param_view(zero_point, xd, axis).cpu()
    x = (v - z) * s
    return x.to(dtype).to(device)


def dyadic_dy(shape, dtype, device) -> Tensor:
    """Upstream gradient on a 1/8 grid in [-2, 2]: exact in every float dtype."""
    return (torch.randint(-16, 17, tuple(shape)).to(torch.float64) / 8).to(dtype).to(device)


def assert_same_meta(x, y):
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device


def _check_grad(name, got, want, abs_sum, rtol, extra=None, like=None):
    assert got is not None, f"{name}: missing gradient"
    assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}, expected float32"
    if like is not None:
        assert got.shape == like.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(like.shape)}"
    got64 = got.detach().cpu().to(torch.float64)
    want = want.cpu()
    tol = rtol * abs_sum.cpu() + 1e-30
    if extra is not None:
        tol = tol + extra.cpu()
    err = (got64 - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{name}: got {got64[bad][:5].tolist()} expected {want[bad][:5].tolist()} "
        f"(tolerance {tol[bad][:5].tolist()})")


def _extra_tolerance(x, scale, zp, dy, qmin, qmax, axis, grad_factor, skip, exact):
    """Per-parameter slack for ds/dz beyond the float32 summation error.

    Inexact data: v = x/s + z is rounded twice in float32, so each in-range term
    dy*(q - v)*g carries an error up to |dy|*|g|*2**-23*(|x/s| + |z|) (large when |v| is).
    Near ties (``skip``) a flipped rounding decision changes an element's term by at most
    |dy|*(range+2)*|g| for ds and |dy|*s*|g| for dz.
    """
    if exact and skip is None:
        return None, None
    x64 = x.detach().to(torch.float64)
    s = ref.param_view(scale, x, axis)
    z = ref.param_view(zp, x, axis)
    dy_abs = dy.detach().to(torch.float64).abs() * abs(grad_factor)
    el_s = torch.zeros_like(x64)
    el_z = torch.zeros_like(x64)
    if not exact:
        v_abs = (x64 / s).abs() + z.abs()
        el_s = el_s + torch.nan_to_num(dy_abs * v_abs * 2.0 ** -22, nan=0.0)
    if skip is not None:
        sk = skip.to(torch.float64)
        el_s = el_s + dy_abs * sk * (qmax - qmin + 2)
        el_z = el_z + dy_abs * sk * s
    extra_s = ref.reduce_to_param(el_s, x, axis, scale)
    extra_z = None if zp is None else ref.reduce_to_param(el_z, x, axis, zp)
    return extra_s, extra_z


def check_vs_reference(x, scale, zp, dy, y, dx, ds, dz, *, qmin, qmax, axis=None,
                       grad_factor=1.0, exact=True, skip: Optional[Tensor] = None, rtol=1e-5):
    """Compare a kernel's output and gradients with the float64 contract.

    ``exact``: inputs were built so the float32 evaluation is exact (dyadic data, power-of-two
    scales, integer offsets): y and dx must match bit for bit. Otherwise y may be off by one
    ulp of its dtype (rounding of the final product), and elements in ``skip`` (near .5 ties,
    where float32 and float64 may round differently) are only checked to be within one step.
    ds/dz are float32 sums: tolerance ``rtol`` times the sum of |terms|, plus, for skipped
    elements, the largest change a flipped rounding decision can make.
    """
    r = ref.fake_quant_grads_ref(dy, x, scale, zp, quant_min=qmin, quant_max=qmax, axis=axis,
                                 grad_factor=grad_factor)
    y_ref = ref.fake_quant_ref(x, scale, zp, quant_min=qmin, quant_max=qmax, axis=axis)
    if y is not None:
        assert_same_meta(x, y)
        y64 = y.detach().cpu().to(torch.float64)
        y_ref = y_ref.cpu()
        keep = torch.ones_like(y64, dtype=torch.bool) if skip is None else ~skip.cpu()
        if exact:
            want = y_ref.to(x.dtype).to(torch.float64)
            diff = (y64 != want) & keep
            assert not diff.any(), (
                f"y: x={x.detach().cpu().to(torch.float64)[diff][:5].tolist()} "
                f"got {y64[diff][:5].tolist()} expected {want[diff][:5].tolist()}")
        else:
            s = ref.param_view(scale, x, axis).cpu()
            z = ref.param_view(zp, x, axis).cpu()
            # the product (q - z) * s rounds once to float32 and once more to x's dtype;
            # a non-integer z makes q - z inexact in float32 as well
            mag = y_ref.abs() + (z - torch.round(z)).abs() * s
            tol = ref.ulp(mag, x.dtype) + ref.ulp(mag, torch.float32)
            err = (y64 - y_ref).abs()
            diff = ~(err <= tol) & keep
            assert not diff.any(), (
                f"y: x={x.detach().cpu().to(torch.float64)[diff][:5].tolist()} "
                f"got {y64[diff][:5].tolist()} expected {y_ref[diff][:5].tolist()}")
            if skip is not None:
                step = (s * (1 + 1e-3)).expand_as(y64)
                far = (err > step) & ~keep
                assert not far.any(), f"y near ties: got {y64[far][:5].tolist()}"
    if dx is not None:
        assert_same_meta(x, dx)
        dx64 = dx.detach().cpu().to(torch.float64)
        want = r.dx.cpu()
        keep = torch.ones_like(dx64, dtype=torch.bool) if skip is None else ~skip.cpu()
        diff = (dx64 != want) & keep
        assert not diff.any(), (
            f"dx: x={x.detach().cpu().to(torch.float64)[diff][:5].tolist()} "
            f"got {dx64[diff][:5].tolist()} expected {want[diff][:5].tolist()}")
        if skip is not None:  # near a tie either answer is fine, but only dy or 0
            dy64 = dy.detach().cpu().to(torch.float64)
            odd = ~keep & (dx64 != dy64) & (dx64 != 0)
            assert not odd.any()
    extra_s, extra_z = _extra_tolerance(x, scale, zp, dy, qmin, qmax, axis, grad_factor, skip,
                                        exact)
    if ds is not None:
        _check_grad("grad_scale", ds, r.ds, r.ds_abs, rtol, extra_s, like=scale)
    if dz is not None:
        assert zp is not None
        _check_grad("grad_zero_point", dz, r.dz, r.dz_abs, rtol, extra_z, like=zp)
    return r


def check_vs_peer(x, scale, zp, dy, y, dx, ds, dz, *, qmin, qmax, axis=None, grad_factor=1.0,
                  skip: Optional[Tensor] = None, rtol=1e-5):
    """Compare with PyTorch's learnable fake-quantize op, evaluated in float32 on x upcast.

    Only meaningful where the peer agrees with the contract: power-of-two scales (or ``skip``
    covering the elements near ties) and even integer zero points inside [qmin, qmax].
    """
    x32 = x.detach().float()
    p = ref.peer_forward_and_grads(dy.detach().float(), x32, scale, zp, quant_min=qmin,
                                   quant_max=qmax, axis=axis, grad_factor=grad_factor)
    keep = None if skip is None else ~skip
    r = ref.fake_quant_grads_ref(dy, x, scale, zp, quant_min=qmin, quant_max=qmax, axis=axis,
                                 grad_factor=grad_factor)
    if y is not None:
        want = p.y.to(x.dtype).float()
        got = y.detach().float()
        diff = got != want
        if skip is not None:
            # away from ties the final product may still differ by an ulp of x's dtype
            tol = ref.ulp(want, x.dtype).to(want.device).float()
            diff = ~((got - want).abs() <= tol) & keep
        assert not diff.any(), (
            f"y vs peer: x={x32[diff][:5].tolist()} got {got[diff][:5].tolist()} "
            f"peer {want[diff][:5].tolist()}")
    if dx is not None:
        got = dx.detach().float()
        diff = got != p.dx
        if keep is not None:
            diff &= keep
        assert not diff.any(), (
            f"dx vs peer: x={x32[diff][:5].tolist()} got {got[diff][:5].tolist()} "
            f"peer {p.dx[diff][:5].tolist()}")
    extra_s, extra_z = _extra_tolerance(x, scale, zp, dy, qmin, qmax, axis, grad_factor, skip,
                                        exact=skip is None)
    if extra_s is not None and skip is not None:
        extra_s = 2 * extra_s  # both sides evaluate v in float32 (the peer as x * (1/s)) sums in float32 as well: allow both errors
    if ds is not None:
        _check_grad("grad_scale vs peer", ds, p.ds.to(torch.float64), r.ds_abs, 2 * rtol,
                    extra_s, like=scale)
    if dz is not None:
        _check_grad("grad_zero_point vs peer", dz, p.dz.to(torch.float64), r.dz_abs, 2 * rtol,
                    extra_z, like=zp)
    return p


# ---------------------------------------------------------------------- codec blobs (fuzzing)

def read_blob(blob):
    """(tensors, metadata) of a safetensors blob, read without the codec."""
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    return dict(st_load(blob)), dict(meta)


def forge(blob, tensors_fn=None, meta_fn=None, valid_digest=True):
    """Re-serializes a codec blob after changing its tensors and/or metadata, with a recomputed
    (valid) digest or the old one."""
    from oqfl_ext._io import tensor_bytes
    from oqfl_ext.fl import codec as codec_mod  # its private digest: a forged blob can pass it
    tensors, meta = read_blob(blob)
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    if valid_digest:
        meta["digest"] = codec_mod._digest(meta, {
            k: (codec_mod._ST_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape),
                tensor_bytes(t)) for k, t in tensors.items()})
    return st_save(tensors, metadata=meta)


def settle_batchnorm(model: torch.nn.Module, x: Tensor) -> None:
    """Running statistics of real activations (those of the batch x) and non-trivial affine
    parameters (random gammas and betas), so that BatchNorm is not the identity and its folding
    is tested; leaves the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in bns:
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    model.eval()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block (an in-process reference run
    with the thread count of the Flower processes gives the same float results)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def assert_state_close(got, want, rtol=1e-4, atol=1e-5):
    """Two state dicts with the same keys: floating-point entries within tolerance (a model
    trained by other processes: float rounding), the others equal."""
    assert set(got) == set(want)
    for k, v in want.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(got[k], v), k
