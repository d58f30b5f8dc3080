"""quantize_model: swap every nn.Conv2d / nn.Linear of a module tree for its quantized twin."""

from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .layers import QuantConv2d, QuantLinear
from .quantizer import GRAD_COUNTS, INIT_METHODS, QUANT_DEFAULTS, LSQQuantizer, bit_range

__all__ = ["quantize_model", "quantization_summary", "calibrate", "set_quantizers_enabled",
           "edge_layers", "post_training_quantize"]

# exact types only: a subclass may not call its own forward (nn.MultiheadAttention reads its
# out_proj's weight directly), so quantizing it could silently do nothing
_REPLACEMENTS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
_LAYER_KEYS = ("weight_bits", "act_bits", "act_signed")

Override = Union[None, int, Mapping[str, Optional[Union[int, bool]]]]


def _layer_config(name: str, base: dict, override: Override) -> Optional[dict]:
    """The constructor options of one layer, or None to keep it in float."""
    if override is None:
        return None
    if isinstance(override, int) and not isinstance(override, bool):
        return dict(base, weight_bits=override, act_bits=override)
    if isinstance(override, Mapping):
        unknown = set(override) - set(_LAYER_KEYS)
        if unknown:
            raise ValueError(f"overrides[{name!r}] expected keys among {_LAYER_KEYS}, "
                             f"got {sorted(unknown)}")
        cfg = dict(base, **override)
        for key in ("weight_bits", "act_bits"):
            if cfg[key] is not None:
                bit_range(cfg[key], True, f"overrides[{name!r}][{key!r}]")
        return cfg
    raise ValueError(f"overrides[{name!r}] expected None (keep float), bits (int) or a dict "
                     f"with keys among {_LAYER_KEYS}, got {override!r}")


def _targets(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The layers quantize_model replaces, by name, in ``named_modules()`` order (every name,
    so a module registered twice is swapped at each place)."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False)
            if type(m) in _REPLACEMENTS and name]


def edge_layers(model: nn.Module) -> Tuple[str, str]:
    """Names of the first and the last layer :func:`quantize_model` replaces (the ones
    ``first_last_bits`` applies to); e.g. ``overrides={name: None for name in
    edge_layers(model)}`` keeps both in float."""
    targets = _targets(model)
    if not targets:
        raise ValueError("model expected a module tree containing Conv2d/Linear layers")
    return targets[0][0], targets[-1][0]


def quantize_model(model: nn.Module, weight_bits: Optional[int] = 4,
                   act_bits: Optional[int] = 4,
                   first_last_bits: Union[int, str, None] = QUANT_DEFAULTS["first_last_bits"],
                   overrides: Optional[Dict[str, Override]] = None, inplace: bool = False,
                   verbose: bool = False, *, init: str = QUANT_DEFAULTS["init"],
                   grad_factor: Optional[float] = None,
                   act_grad_count: str = QUANT_DEFAULTS["act_grad_count"]) -> nn.Module:
    """Replace every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` by ``QuantConv2d`` /
    ``QuantLinear`` with the same weights (see ``from_float``).

    Args:
        model: any module tree.
        weight_bits, act_bits: bits of the weights and inputs of every layer (2..8; ``None``
            keeps that side in float).
        first_last_bits: bits of both weights and inputs of the first and the last of those
            layers, in ``model.named_modules()`` order (registration order, which is the
            execution order in the usual networks); ``"float"`` keeps both in float; ``None``:
            no exception for them. Default ``QUANT_DEFAULTS["first_last_bits"]``.
        overrides: per-layer settings by module name (as in ``named_modules()``), applied last:
            ``None`` keeps the layer in float, an int sets both bit widths, a dict sets any of
            ``weight_bits``, ``act_bits``, ``act_signed``. A name that is not a Conv2d/Linear
            of the model is an error.
        inplace: modify ``model`` itself instead of a deep copy.
        verbose: print :func:`quantization_summary` of the result.
        init: how every new quantizer sets its step size from the first batch, ``"mse"`` or
            ``"lsq"`` (:class:`LSQQuantizer`'s ``init``); default ``QUANT_DEFAULTS["init"]``.
        grad_factor: gradient scale of every new quantizer's step size and offset; ``None``:
            LSQ's ``1 / sqrt(N_s x qmax)`` (:class:`LSQQuantizer`'s ``grad_factor``).
        act_grad_count: what ``N_s`` counts for the input quantizers: ``"example"`` (the
            elements of one example, LSQ's paper) or ``"all"`` (of the whole batch);
            :class:`LSQQuantizer`'s ``grad_count``. Default
            ``QUANT_DEFAULTS["act_grad_count"]``.

    Only modules whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` are replaced; subclasses
    (which may not run their own ``forward``) are left alone and listed by the summary as
    float. Input quantizers decide their signedness from the first batch (``act_signed=None``)
    unless overridden. Returns the quantized model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model expected an nn.Module, got {type(model).__name__}")
    for arg, bits in (("weight_bits", weight_bits), ("act_bits", act_bits)):
        if bits is not None:
            bit_range(bits, True, arg)
    edge_float = isinstance(first_last_bits, str) and first_last_bits == "float"
    if first_last_bits is not None and not edge_float:
        if isinstance(first_last_bits, str):
            raise ValueError(f"first_last_bits expected an integer in 2..8, 'float' or None, "
                             f"got {first_last_bits!r}")
        bit_range(first_last_bits, True, "first_last_bits")
    if act_grad_count not in GRAD_COUNTS:
        raise ValueError(f"act_grad_count expected one of {GRAD_COUNTS}, got "
                         f"{act_grad_count!r}")
    if init not in INIT_METHODS:
        raise ValueError(f"init expected one of {INIT_METHODS}, got {init!r}")
    if grad_factor is not None and (isinstance(grad_factor, bool)
                                    or not isinstance(grad_factor, (int, float))
                                    or not 0 < grad_factor < float("inf")):
        raise ValueError(f"grad_factor expected None or a positive number, got {grad_factor!r}")
    overrides = dict(overrides or {})
    if not inplace:
        model = copy.deepcopy(model)

    targets = _targets(model)
    if not targets and type(model) in _REPLACEMENTS:
        raise ValueError("model expected a module tree containing layers; to quantize a single "
                         "layer use QuantConv2d.from_float / QuantLinear.from_float")
    names = {name for name, _ in targets}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"overrides names no Conv2d/Linear of the model: {unknown} "
                         f"(layers: {sorted(names)[:20]}{' ...' if len(names) > 20 else ''})")

    base = dict(weight_bits=weight_bits, act_bits=act_bits, act_signed=None)
    edge = {targets[0][0], targets[-1][0]} if targets and first_last_bits is not None else set()
    replaced: Dict[int, nn.Module] = {}  # a module registered twice is replaced once
    for name, module in targets:
        if id(module) in replaced:
            new = replaced[id(module)]
        else:
            cfg = dict(base)
            if name in edge:
                cfg = None if edge_float else dict(cfg, weight_bits=first_last_bits,
                                                   act_bits=first_last_bits)
            if name in overrides:
                cfg = _layer_config(name, dict(base) if cfg is None else cfg, overrides[name])
            if cfg is None:
                continue
            new = _REPLACEMENTS[type(module)].from_float(module, **cfg)
            for q in (new.weight_quantizer, new.act_quantizer):
                if q is not None:
                    q.init = init
                    q.grad_factor = None if grad_factor is None else float(grad_factor)
            if new.act_quantizer is not None:
                new.act_quantizer.grad_count = act_grad_count
            replaced[id(module)] = new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    if verbose:
        print(quantization_summary(model))
    return model


def _layer_rows(model: nn.Module) -> List[dict]:
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, nn.Conv2d):
            shape = f"{m.in_channels}->{m.out_channels}, k{'x'.join(map(str, m.kernel_size))}" \
                    + (f", s{m.stride[0]}" if m.stride != (1, 1) else "") \
                    + (f", g{m.groups}" if m.groups != 1 else "")
        else:
            shape = f"{m.in_features}->{m.out_features}"
        quant = isinstance(m, (QuantConv2d, QuantLinear))
        act = "float"
        if quant and m.act_quantizer is not None:
            q = m.act_quantizer
            signed = q.is_signed
            act = "auto" if signed is None else "signed" if signed else "unsigned"
            if q.learn_offset and signed is not False:
                act += "+offset"
        rows.append(dict(name=name or "(model)", type=type(m).__name__, shape=shape,
                         weight_bits=m.weight_bits if quant else None,
                         act_bits=m.act_bits if quant else None, act=act,
                         params=sum(p.numel() for p in m.parameters(recurse=False))))
    return rows


def quantization_summary(model: nn.Module) -> str:
    """A markdown table of every Conv2d/Linear of ``model``: name, type, shape, weight and
    input bits (``float`` when not quantized), input code range and parameter count."""
    lines = ["| layer | type | shape | W bits | A bits | input codes | params |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in _layer_rows(model):
        wb = "float" if r["weight_bits"] is None else r["weight_bits"]
        ab = "float" if r["act_bits"] is None else r["act_bits"]
        lines.append(f"| {r['name']} | {r['type']} | {r['shape']} | {wb} | {ab} | {r['act']} "
                     f"| {r['params']} |")
    return "\n".join(lines)


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every :class:`LSQQuantizer` in ``model`` on or off (off: identity, float model)."""
    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.enabled = bool(enabled)


@torch.no_grad()
def calibrate(model: nn.Module, *inputs) -> nn.Module:
    """Initialize every quantizer of ``model`` from one batch: ``model(*inputs)`` without
    gradient, in the model's current mode (so training-mode batch norm shows the quantizers
    what training will show them), after which every buffer outside the quantizers (batch-norm
    running statistics) is restored: the quantizers' initialization is the only effect.

    Useful before ``torch.compile``, which cannot inspect the first batch itself."""
    quantizer_buffers = {id(b) for m in model.modules() if isinstance(m, LSQQuantizer)
                         for b in m.buffers()}
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in quantizer_buffers]
    try:
        model(*inputs)
    finally:
        for b, value in saved:
            if b.shape == value.shape:
                b.copy_(value)
            else:  # e.g. an observer's lazily sized min/max
                b.data = value
    return model


def post_training_quantize(model: nn.Module, calibration_inputs: torch.Tensor,
                           weight_bits: Optional[int] = 4, act_bits: Optional[int] = 4,
                           **kwargs) -> nn.Module:
    """Post-training quantization (PTQ), the baseline for quantization-aware training: a
    quantized copy of the trained float ``model`` (:func:`quantize_model` with ``kwargs``;
    ``init`` defaults to ``"mse"``, the error-minimizing range, since nothing trains the steps
    afterwards) whose step sizes are set from ``calibration_inputs`` in eval mode (batch norm
    with its running statistics, as deployed) and never trained. Returned in eval mode."""
    if not isinstance(calibration_inputs, torch.Tensor) or calibration_inputs.numel() == 0:
        raise ValueError("calibration_inputs expected a non-empty tensor of inputs")
    kwargs.setdefault("init", "mse")
    q = quantize_model(model, weight_bits=weight_bits, act_bits=act_bits, inplace=False,
                       **kwargs)
    q.eval()
    calibrate(q, calibration_inputs)
    return q
