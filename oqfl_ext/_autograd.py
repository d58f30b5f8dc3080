"""Autograd for ``oqfl::fake_quant``: the backward is the ``oqfl::fake_quant_backward`` op,
asked only for the gradients autograd needs."""

from __future__ import annotations

import torch


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, scale, zero_point = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.attrs = dict(keyword_only_inputs)


def _backward(ctx, grad_output):
    x, scale, zero_point = ctx.saved_tensors
    # The dispatcher drops arguments equal to their defaults (zero_point=None), so
    # needs_input_grad may have only two entries.
    need_x, need_scale, need_zero_point = (tuple(ctx.needs_input_grad) + (False,))[:3]
    grad_x, grad_scale, grad_zero_point = torch.ops.oqfl.fake_quant_backward(
        grad_output, x, scale, zero_point,
        output_mask=[need_x, need_scale, need_zero_point and zero_point is not None],
        **ctx.attrs,
    )
    return (grad_x if need_x else None,
            grad_scale if need_scale else None,
            grad_zero_point if need_zero_point else None)


torch.library.register_autograd("oqfl::fake_quant", _backward, setup_context=_setup_context)
