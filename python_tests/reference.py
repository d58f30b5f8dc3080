"""Pure-PyTorch references for the oqfl fake-quantizer tests.

Two independent oracles:

* ``fake_quant_ref`` / ``fake_quant_grads_ref``: the LSQ contract of docs/DESIGN.md section 2,
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
    """Bytes of integer codes (any int dtype, row-major), from the layout of docs/DESIGN.md section 3
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


_MASK32 = (1 << 32) - 1


def _mul32(h: Tensor, m: int) -> Tensor:
    """h * m mod 2^32 for int64 tensors of uint32 values, in 16-bit halves of m (a 32x32-bit
    product would overflow int64)."""
    return (h * (m & 0xFFFF) + (((h * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: Tensor, shifts_muls) -> Tensor:
    """xorshift-multiply rounds, then a final xorshift by 16, on uint32 values."""
    for shift, mul in shifts_muls:
        h = _mul32(h ^ (h >> shift), mul)
    return h ^ (h >> 16)


def counter_uniform_ref(seed: int, n: int, start: int = 0) -> Tensor:
    """The uniforms of quantize_pack's stochastic rounding for elements start..start+n-1
    (float64), written out from its docstring: int64 tensors holding uint32 values."""
    key = _splitmix64(seed & _MASK64)
    i = torch.arange(start, start + n, dtype=torch.int64)
    high = i >> 32
    add = key & _MASK32
    mid = (key >> 32) ^ _mul32(high & _MASK32, 0x9E3779B9)
    h = _mix32(((i & _MASK32) + add) & _MASK32, [(16, 0x85EBCA6B), (13, 0xC2B2AE35)])
    h = _mix32((h + mid) & _MASK32, [(16, 0x7FEB352D), (15, 0x846CA68B)])
    return (h >> 8).to(torch.float64) * 2.0 ** -24


# ------------------------------------------------------------------ integer inference

def quantize_activation_ref(x: Tensor, x_scale: Tensor, x_zero_point: Tensor, *,
                            x_quant_min: int, x_quant_max: int) -> Tensor:
    """int64 activation codes of qconv2d / qlinear (qconv_args.h), on the CPU.

    float32 x: ``clamp(round(x / s + zp), qmin, qmax)`` evaluated as the kernels do, one float32
    operation at a time (x / s rounded to float32, then + zp rounded to float32, then
    ``torch.round``: half to even). uint8 / int8 x: the codes as they are (qmin/qmax ignored).
    """
    x = x.detach().cpu()
    if x.dtype != torch.float32:
        return x.to(torch.int64)
    s = x_scale.detach().cpu().reshape(()).to(torch.float32)
    z = x_zero_point.detach().cpu().reshape(()).to(torch.float32)
    v = x / s
    v = v + z
    return torch.round(v).clamp(x_quant_min, x_quant_max).to(torch.int64)


def quantize_output_ref(v: Tensor, out_scale: Tensor, out_zero_point: Tensor, *,
                        out_quant_min: int, out_quant_max: int) -> Tensor:
    """int64 output codes of qconv2d / qlinear with ``out_scale`` (qconv_args.h): float32
    ``clamp(round(v / s + zp), qmin, qmax)`` one float32 operation at a time (as
    :func:`quantize_activation_ref`), a NaN value giving code 0."""
    v = v.detach().cpu().to(torch.float32)
    s = out_scale.detach().cpu().reshape(()).to(torch.float32)
    z = out_zero_point.detach().cpu().reshape(()).to(torch.float32)
    q = torch.round(v / s + z).clamp(out_quant_min, out_quant_max)
    return torch.where(q.isnan(), torch.zeros_like(q), q).to(torch.int64)


def _requantize_ref(centered: Tensor, x_scale: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor], relu: bool, channel_shape,
                    residual: Optional[Tensor] = None,
                    clamp_max: Optional[float] = None) -> Tensor:
    """float32 float(acc - zp * wsum) * (x_scale * w_scale) + bias (+ residual), then relu and
    min(., clamp_max), each op rounded on its own (``centered`` = acc - zp * wsum, exact in
    int64). NaN propagates through relu and the clamp (torch.clamp_min / torch.minimum)."""
    scale = x_scale.detach().cpu().reshape(()).to(torch.float32) * \
        w_scale.detach().cpu().to(torch.float32)               # one float32 product per channel
    out = centered.to(torch.float32) * scale.reshape(channel_shape)
    if bias is not None:
        out = out + bias.detach().cpu().to(torch.float32).reshape(channel_shape)
    if residual is not None:
        out = out + residual.detach().cpu().to(torch.float32)
    if relu:
        out = torch.clamp_min(out, 0.0)
    if clamp_max is not None:
        out = torch.minimum(out, torch.tensor(clamp_max, dtype=torch.float32))
    return out


def _output_ref(out: Tensor, out_scale, out_zero_point, out_quant_min, out_quant_max):
    """The float output, or its codes (uint8 when out_quant_min >= 0, else int8) when
    out_scale is given."""
    if out_scale is None:
        return out
    q = quantize_output_ref(out, out_scale, out_zero_point, out_quant_min=out_quant_min,
                            out_quant_max=out_quant_max)
    return q.to(torch.int8 if out_quant_min < 0 else torch.uint8)


def _pair_ref(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def qconv2d_acc_ref(u: Tensor, zp: int, w_codes: Tensor, *, stride=1, padding=0, dilation=1,
                    groups=1) -> Tensor:
    """int64 ``sum over taps and channels of (u - zp) * w`` of integer codes u ``[N, C, H, W]``
    and w ``[OC, C / groups, KH, KW]``, the input padded with the code ``zp``.

    Computed as ``sum u * w - zp * wsum`` like the kernels: the padded input, one strided view
    per kernel tap, an einsum over the group's channels in int64 (exact whatever the size)."""
    sh, sw = _pair_ref(stride)
    ph, pw = _pair_ref(padding)
    dh, dw = _pair_ref(dilation)
    u = u.to(torch.int64)
    w = w_codes.to(torch.int64)
    n, c, h, wd = u.shape
    oc, icg, kh, kw = w.shape
    g = groups
    ocg = oc // g
    up = torch.nn.functional.pad(u, (pw, pw, ph, ph), value=zp)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    up = up.reshape(n, g, icg, h + 2 * ph, wd + 2 * pw)
    wg = w.reshape(g, ocg, icg, kh, kw)
    acc = torch.zeros((n, g, ocg, oh, ow), dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            tap = up[:, :, :, i * dh: i * dh + (oh - 1) * sh + 1: sh,
                     j * dw: j * dw + (ow - 1) * sw + 1: sw]
            acc += torch.einsum("ngchw,goc->ngohw", tap, wg[:, :, :, i, j])
    wsum = w.sum(dim=(1, 2, 3))
    return acc.reshape(n, oc, oh, ow) - zp * wsum.reshape(1, oc, 1, 1)


def qconv2d_ref(x, x_scale, x_zero_point, w_packed, w_scale, bias=None, *, w_bits, stride=1,
                padding=0, dilation=1, groups=1, relu=False, x_quant_min=0,
                x_quant_max=255, residual=None, clamp_max=None, out_scale=None,
                out_zero_point=None, out_quant_min=0, out_quant_max=255) -> Tensor:
    """The contract of ``oqfl::qconv2d`` (qconv_args.h) in plain PyTorch, on the CPU.

    Activation codes from :func:`quantize_activation_ref`, weight codes from
    ``oqfl_ext.ops.unpack_conv_weight``, the accumulator from :func:`qconv2d_acc_ref` (int64,
    exact whatever its size: the input is padded with the code ``x_zero_point`` and the
    products are summed per kernel tap). ``F.conv2d`` in float64 on the integer codes would be
    exact as well, every partial sum being an integer of magnitude below
    255 * 128 * IC * KH * KW << 2**53, but int64 needs no such argument and shares no code with
    the convolution the float comparison uses. The rescale is done as separate float32
    operations: ``float(acc - zp * wsum) * (x_scale * w_scale) + bias``, then the residual,
    relu and clamp_max, and with ``out_scale`` the codes of :func:`quantize_output_ref`.
    Returns a contiguous NCHW tensor on the CPU: float32, or the codes as uint8 / int8.
    """
    from oqfl_ext.ops import unpack_conv_weight  # lazy: reference.py imports without _C

    oc = w_scale.shape[0]
    icg = x.shape[1] // groups
    wc = unpack_conv_weight(w_packed.detach().cpu(), w_bits, oc, icg)
    zp = int(x_zero_point.detach().cpu().reshape(()))
    u = quantize_activation_ref(x, x_scale, x_zero_point, x_quant_min=x_quant_min,
                                x_quant_max=x_quant_max)
    centered = qconv2d_acc_ref(u, zp, wc, stride=stride, padding=padding, dilation=dilation,
                               groups=groups)
    out = _requantize_ref(centered, x_scale, w_scale, bias, relu, (1, oc, 1, 1), residual,
                          clamp_max)
    return _output_ref(out, out_scale, out_zero_point, out_quant_min, out_quant_max)


def qlinear_ref(x, x_scale, x_zero_point, w_packed, w_scale, bias=None, *, w_bits, relu=False,
                x_quant_min=0, x_quant_max=255, residual=None, clamp_max=None, out_scale=None,
                out_zero_point=None, out_quant_min=0, out_quant_max=255) -> Tensor:
    """The contract of ``oqfl::qlinear``: ``[..., IC]`` times the codes of
    ``oqfl_ext.ops.unpack_linear_weight`` (int64 matmul, exact), rescaled and finished (residual,
    relu, clamp_max, codes) as in :func:`qconv2d_ref`. Returns a contiguous ``[..., OC]``
    tensor on the CPU (float32, or uint8 / int8 codes)."""
    from oqfl_ext.ops import unpack_linear_weight

    oc, ic = w_scale.shape[0], x.shape[-1]
    wc = unpack_linear_weight(w_packed.detach().cpu(), w_bits, oc, ic).to(torch.int64)
    zp = int(x_zero_point.detach().cpu().reshape(()))
    u = quantize_activation_ref(x, x_scale, x_zero_point, x_quant_min=x_quant_min,
                                x_quant_max=x_quant_max).reshape(-1, ic)
    centered = u @ wc.t() - zp * wc.sum(dim=1)
    res = None if residual is None else residual.reshape(-1, oc)
    out = _requantize_ref(centered, x_scale, w_scale, bias, relu, (1, oc), res, clamp_max)
    out = _output_ref(out, out_scale, out_zero_point, out_quant_min, out_quant_max)
    return out.reshape(*x.shape[:-1], oc)


def qconv_dequantized_inputs(x, x_scale, x_zero_point, w_codes, w_scale, *, x_quant_min=0,
                             x_quant_max=255):
    """float64 dequantized activations ``(u - zp) * x_scale`` and weights ``w * w_scale``
    (for comparing the integer ops with F.conv2d / F.linear)."""
    u = quantize_activation_ref(x, x_scale, x_zero_point, x_quant_min=x_quant_min,
                                x_quant_max=x_quant_max)
    zp = int(x_zero_point.detach().cpu().reshape(()))
    xs = float(x_scale.detach().cpu().reshape(()))
    ws = w_scale.detach().cpu().to(torch.float64)
    xd = (u - zp).to(torch.float64) * xs
    wd = w_codes.detach().cpu().to(torch.float64) * ws.reshape(-1, *([1] * (w_codes.dim() - 1)))
    return xd, wd
