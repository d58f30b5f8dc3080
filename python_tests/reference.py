"""Pure-PyTorch references for the oqfl fake-quantizer tests.

Two independent oracles:

* ``fake_quant_ref`` / ``fake_quant_grads_ref``: the LSQ contract of DESIGN.md section 2,
  evaluated in float64 from the inputs upcast (so a half-precision ``x`` is taken exactly as
  stored). Rounding is ``torch.round`` (half to even).
* ``peer_forward_and_grads``: PyTorch's own learnable fake-quantize ops. They need a float
  ``zero_point`` holding integers inside ``[quant_min, quant_max]`` and compute the forward as
  ``round(x * (1/s)) + z`` while their backward uses ``round(x * (1/s) + z)``. That agrees with
  ``round(x/s + z)`` only when ``x * (1/s) == x / s`` (power-of-two scales) and, on exact .5 ties,
  only when ``z`` is even (half-to-even rounding is not invariant under odd shifts). Its
  per-tensor backward also rounds ``z`` as ``int(z + 0.5)``, which truncates toward zero, so a
  negative ``z`` is off by one there. Callers choose their inputs accordingly (power-of-two
  scales, even non-negative offsets), or compare away from ties.

Plus helpers used to build tolerances: ``near_tie_mask`` and ``ulp``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


def _axis(x: Tensor, axis: Optional[int]) -> Optional[int]:
    return None if axis is None else axis % x.dim()


def param_view(p: Optional[Tensor], x: Tensor, axis: Optional[int]) -> Tensor:
    """float64 copy of a per-tensor / per-channel parameter, broadcastable against ``x``."""
    if p is None:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    p = p.detach().to(device=x.device, dtype=torch.float64)
    ax = _axis(x, axis)
    if ax is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[ax] = -1
    return p.reshape(shape)


def reduce_to_param(t: Tensor, x: Tensor, axis: Optional[int], like: Tensor) -> Tensor:
    """Sum ``t`` (shaped like x) over every dim but ``axis``; result has ``like``'s shape."""
    ax = _axis(x, axis)
    if ax is None:
        return t.sum().reshape(like.shape)
    dims = [d for d in range(x.dim()) if d != ax]
    out = t.sum(dim=dims) if dims else t  # sum(dim=[]) would reduce everything
    return out.reshape(like.shape)


def _parts(x, scale, zero_point, quant_min, quant_max, axis):
    x64 = x.detach().to(torch.float64)
    s = param_view(scale, x, axis)
    z = param_view(zero_point, x, axis)
    v = x64 / s + z
    r = torch.round(v)  # half to even, like nearbyint
    q = torch.clamp(r, quant_min, quant_max)
    return x64, s, z, v, r, q


def fake_quant_ref(x, scale, zero_point=None, *, quant_min, quant_max, axis=None) -> Tensor:
    """float64 forward: (clamp(round(x/s + z), qmin, qmax) - z) * s."""
    _, s, z, _, _, q = _parts(x, scale, zero_point, quant_min, quant_max, axis)
    return (q - z) * s


class RefGrads(NamedTuple):
    dx: Tensor                 # float64, x's shape
    ds: Tensor                 # float64, scale's shape
    dz: Optional[Tensor]       # float64, zero_point's shape (None without zero_point)
    ds_abs: Tensor             # sum of |per-element terms| of ds: scale for tolerances
    dz_abs: Optional[Tensor]
    below: Tensor              # bool masks, x's shape
    above: Tensor


def fake_quant_grads_ref(dy, x, scale, zero_point=None, *, quant_min, quant_max, axis=None,
                         grad_factor=1.0) -> RefGrads:
    """float64 gradients of the contract (straight-through estimator; qmin/qmax are in range)."""
    x64, s, z, v, r, q = _parts(x, scale, zero_point, quant_min, quant_max, axis)
    dy64 = dy.detach().to(torch.float64)
    below = r < quant_min
    above = r > quant_max
    inside = ~(below | above)
    g = float(grad_factor)
    dx = torch.where(inside, dy64, torch.zeros_like(dy64))
    ds_el = dy64 * torch.where(below, quant_min - z, torch.where(above, quant_max - z, q - v)) * g
    ds = reduce_to_param(ds_el, x, axis, scale)
    ds_abs = reduce_to_param(ds_el.abs(), x, axis, scale)
    dz = dz_abs = None
    if zero_point is not None:
        dz_el = torch.where(inside, torch.zeros_like(dy64), dy64 * (-s) * g)
        dz = reduce_to_param(dz_el, x, axis, zero_point)
        dz_abs = reduce_to_param(dz_el.abs(), x, axis, zero_point)
    return RefGrads(dx, ds, dz, ds_abs, dz_abs, below, above)


def near_tie_mask(x, scale, zero_point=None, *, axis=None, rel=1e-5) -> Tensor:
    """Elements whose v = x/s + z lies within ``rel`` (relative) of a .5 tie.

    There float32 and float64 evaluations of v may round to different integers, so such
    elements are excluded from exact comparisons on random (non power-of-two) data.
    """
    x64 = x.detach().to(torch.float64)
    v = x64 / param_view(scale, x, axis) + param_view(zero_point, x, axis)
    dist = (v - torch.floor(v) - 0.5).abs()
    return dist <= rel * torch.clamp(v.abs(), min=1.0)


def ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 spacing of ``dtype`` at each of ``values`` (subnormal spacing near zero)."""
    fi = torch.finfo(dtype)
    a = values.detach().to(torch.float64).abs().clamp(min=fi.tiny)
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    return fi.eps * torch.pow(2.0, (e - 1).to(torch.float64))


# ---------------------------------------------------------------- PyTorch peer ops

def peer_fake_quant(x, scale, zero_point=None, *, quant_min, quant_max, axis=None,
                    grad_factor=1.0) -> Tensor:
    """PyTorch's learnable fake-quantize op with our argument conventions (differentiable)."""
    zp = zero_point if zero_point is not None else torch.zeros_like(scale)
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zp.reshape(1), quant_min, quant_max, grad_factor)
    if x.dim() == 1:
        # the peer's per-channel backward mishandles 1-D input (it reduces grad_scale to a
        # scalar); a leading unit dim gives the same math
        return torch._fake_quantize_learnable_per_channel_affine(
            x.unsqueeze(0), scale, zp, 1, quant_min, quant_max, grad_factor).squeeze(0)
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zp, axis % x.dim(), quant_min, quant_max, grad_factor)


class PeerResult(NamedTuple):
    y: Tensor
    dx: Tensor
    ds: Tensor
    dz: Optional[Tensor]


def peer_forward_and_grads(dy, x, scale, zero_point=None, *, quant_min, quant_max, axis=None,
                           grad_factor=1.0) -> PeerResult:
    """Output and the three gradients of the peer op, by autograd on detached copies."""
    xr = x.detach().clone().requires_grad_(True)
    sr = scale.detach().clone().requires_grad_(True)
    zr = None if zero_point is None else zero_point.detach().clone().requires_grad_(True)
    y = peer_fake_quant(xr, sr, zr, quant_min=quant_min, quant_max=quant_max, axis=axis,
                        grad_factor=grad_factor)
    y.backward(dy)
    return PeerResult(y.detach(), xr.grad, sr.grad, None if zr is None else zr.grad)


# ------------------------------------------------------------------ packed codes

def pack_ref(codes: Tensor, bits: int) -> Tensor:
    """Bytes of integer codes (any int dtype, row-major), from the layout of DESIGN.md section 3
    written out with Python ints: int4 code 2i in the low nibble of byte i, 2i+1 in the high."""
    c = [int(v) for v in codes.reshape(-1).tolist()]
    if bits == 8:
        return torch.tensor([v & 0xFF for v in c], dtype=torch.uint8)
    if len(c) % 2:
        c.append(0)
    return torch.tensor([(c[i] & 0xF) | ((c[i + 1] & 0xF) << 4) for i in range(0, len(c), 2)],
                        dtype=torch.uint8)


def quantize_codes_ref(x, scale, zero_point=None, *, bits, axis=None, u=None) -> Tensor:
    """Signed codes clamp(round(x/s + z)) in float64 from the inputs upcast (int64 result).

    ``u``: uniforms (shaped like x) for stochastic rounding, floor(v) + (u < frac(v));
    None: half to even."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x64 = x.detach().to(torch.float64)
    v = x64 / param_view(scale, x, axis) + param_view(zero_point, x, axis)
    if u is None:
        r = torch.round(v)
    else:
        f = torch.floor(v)
        r = f + (u.to(torch.float64) < v - f).to(torch.float64)
    return r.clamp(qmin, qmax).to(torch.int64)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def counter_uniform_ref(seed: int, n: int) -> Tensor:
    """The uniforms of quantize_pack's stochastic rounding for elements 0..n-1 (float64), written
    out from its docstring with Python ints."""
    key = _splitmix64(seed & _MASK64)
    out = [(_splitmix64((key + (i + 1) * 0x9E3779B97F4A7C15) & _MASK64) >> 40) * 2.0 ** -24
           for i in range(n)]
    return torch.tensor(out, dtype=torch.float64)
