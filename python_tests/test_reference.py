"""The test oracles themselves: the float64 reference must agree with PyTorch's peer op where
both are defined the same way, and with a hand-worked case. Needs no built extension."""

from __future__ import annotations

import pytest
import torch

import helpers as h
import reference as ref


def test_hand_worked_reference():
    # s = 0.5, z = 0, 2-bit signed [-2, 1], dy = 1: worked out on paper
    x = torch.tensor([-1.5, -1.25, -1.0, -0.25, 0.25, 0.5, 0.75, 0.375, 100.0, -100.0])
    s = torch.tensor(0.5)
    z = torch.tensor(0.0)
    y = ref.fake_quant_ref(x, s, z, quant_min=-2, quant_max=1)
    assert y.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -1.0]
    g = ref.fake_quant_grads_ref(torch.ones_like(x), x, s, z, quant_min=-2, quant_max=1)
    assert g.dx.tolist() == [0, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    assert g.ds.item() == -1.25 and g.dz.item() == -2.0


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_reference_matches_peer(bits, signed, axis):
    # dyadic data, power-of-two scales and even zero points: the two must agree exactly
    qmin, qmax = h.bit_range(bits, signed)
    shape = (6, 5, 7)
    pshape = () if axis is None else (shape[axis],)
    s = h.pow2_scale(pshape, "cpu")
    z = h.int_zero_point(pshape, qmin, qmax, "cpu", even=True)
    x = h.dyadic_x(shape, s, z, qmin, qmax, torch.float32, "cpu", axis=axis)
    dy = h.dyadic_dy(shape, torch.float32, "cpu")
    p = ref.peer_forward_and_grads(dy, x, s, z, quant_min=qmin, quant_max=qmax, axis=axis,
                                   grad_factor=0.75)
    y = ref.fake_quant_ref(x, s, z, quant_min=qmin, quant_max=qmax, axis=axis)
    g = ref.fake_quant_grads_ref(dy, x, s, z, quant_min=qmin, quant_max=qmax, axis=axis,
                                 grad_factor=0.75)
    assert torch.equal(p.y.double(), y)
    assert torch.equal(p.dx.double(), g.dx)
    torch.testing.assert_close(p.ds.double(), g.ds, rtol=0, atol=1e-5 * g.ds_abs.max().item())
    torch.testing.assert_close(p.dz.double(), g.dz, rtol=0, atol=1e-5 * g.dz_abs.max().item())
    # the data really exercises ties, both bounds and both out-of-range sides
    v = x.double() / ref.param_view(s, x, axis) + ref.param_view(z, x, axis)
    assert ((v - v.floor()) == 0.5).any() and (v == qmin).any() and (v == qmax).any()
    assert g.below.any() and g.above.any()


def test_peer_differs_on_odd_zero_point_ties():
    # documents why peer comparisons use even zero points: round(a) + z != round(a + z)
    x = torch.tensor([-2.5])
    s = torch.tensor([1.0])
    z = torch.tensor([1.0])
    p = ref.peer_fake_quant(x, s, z, quant_min=-4, quant_max=3)
    y = ref.fake_quant_ref(x, s, z, quant_min=-4, quant_max=3)
    assert y.item() == -3.0 and p.item() == -2.0


def test_peer_per_tensor_backward_negative_zero_point():
    # documents why peer comparisons use non-negative zero points: the peer's per-tensor
    # backward takes z = -2 as int(-1.5) = -1, so its in-range mask is shifted by one
    x = torch.tensor([-1.0])  # v = x/s + z = -3: below quant_min = -2
    s = torch.tensor([1.0])
    z = torch.tensor([-2.0])
    p = ref.peer_forward_and_grads(torch.ones(1), x, s, z, quant_min=-2, quant_max=1)
    g = ref.fake_quant_grads_ref(torch.ones(1), x, s, z, quant_min=-2, quant_max=1)
    assert g.dx.item() == 0.0 and p.dx.item() == 1.0
