"""The graph part of :func:`oqfl_ext.nn.convert`: trace a quantized model with ``torch.fx`` and
find what its integer layers can absorb.

:func:`trace` records the model's forward as an ``fx`` graph in which the quantized layers
(and every ``torch.nn`` layer) are single nodes. :func:`plan` then rewrites that graph in
place, layer by layer (``int_names``: the call sites of the layers that become integer layers),
and returns a :class:`Fusion` per integer layer saying what its epilogue absorbed:

1. ``nn.Identity`` and ``nn.Dropout`` nodes are dropped (the converted model is for inference:
   eval-mode dropout is the identity).
2. A ``BatchNorm2d`` whose input is an integer convolution used by nothing else is folded into
   it (``Fusion.bn``; the values are folded by the caller, ``can_fold`` says whether they can).
3. A residual add (``a + b``, ``torch.add``, ``+=``, ``Tensor.add``) one operand of which is an
   integer layer used by nothing else (and not yet given an activation) becomes that layer's
   ``residual`` input: the other operand is added to its float result after the bias and
   before the activation, as the fake-quant model adds the two float tensors.
4. A ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``) or ReLU6 (``nn.ReLU6``,
   ``F.relu6``, ``nn.Hardtanh(0, 6)``, ``F.hardtanh(x, 0, 6)``) whose input is such a layer
   becomes its ``relu`` / ``clamp_max``.
5. An integer layer whose result reaches exactly one consumer, as that consumer's input,
   through nothing but max pooling and flatten (each used once), and whose consumer is an
   integer layer that can take codes (``takes_codes``), writes the consumer's input codes
   (``Fusion.out_codes`` names the consumer, whose ``Fusion.input_codes`` is set): the
   quantization ``q(v) = clamp(round(v / s + z), lo, hi)`` is non-decreasing, so
   ``max(q(v_i)) = q(max(v_i))`` for every pooling window (PyTorch's max pooling never lets a
   padding element win and every window holds at least one input element; on codes the
   pooling runs as :func:`max_pool2d_codes`), and flatten only reorders elements. Nothing
   else (average pooling, a float layer, the logits) gets codes.

A layer called at several places is not fused (its call sites could need different
epilogues). :class:`IntegerGraph` is the ``fx.GraphModule`` that ``convert`` returns.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Set

import torch
from torch import fx, nn
from torch.nn import functional as F

from .layers import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["GraphUnsupported", "Fusion", "IntegerGraph", "trace", "plan", "call_sites",
           "max_pool2d_codes"]


class GraphUnsupported(Exception):
    """The model cannot be traced (the message says why)."""


class _Tracer(fx.Tracer):
    """Keeps the quantized layers, the integer layers and every ``torch.nn`` layer whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .integer import _QIntBase
        if isinstance(m, (QuantConv2d, QuantLinear, LSQQuantizer, _QIntBase)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model``'s forward as an ``fx.GraphModule`` sharing its modules, or GraphUnsupported
    naming why it cannot be traced (data-dependent control flow, an untraceable call, ...)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GraphUnsupported(f"torch.fx cannot trace {type(model).__name__}: "
                               f"{type(e).__name__}: {first[:300]}") from None
    return fx.GraphModule(model, graph)


@dataclass
class Fusion:
    """What one integer layer absorbs (see the module docstring)."""

    bn: Optional[str] = None          # the folded BatchNorm2d module's name
    residual: bool = False            # forward takes a float ``residual`` to add
    relu: bool = False
    clamp_max: Optional[float] = None
    input_codes: bool = False         # its input is codes written by its producer
    out_codes: Optional[str] = None   # it writes the input codes of this integer layer

    def to_json(self) -> dict:
        return asdict(self)


class IntegerGraph(fx.GraphModule):
    """The integer inference model :func:`oqfl_ext.nn.convert` builds from a traced model: an
    ``fx.GraphModule`` whose integer layers keep their names in the original model.

    ``source``: ``{"model": name, "kwargs": {...}}`` of ``oqfl_ext.models.create`` when the
    model came from the zoo (so that ``save_packed`` can describe it), else None.
    ``fusions``: the :class:`Fusion` of each integer layer, by name.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, source: Optional[dict] = None,
                 fusions: Optional[Dict[str, Fusion]] = None):
        super().__init__(root, graph, "IntegerGraph")
        self.source = source
        self.fusions = dict(fusions or {})
        # run the forward as one C++ plan where the graph allows (False: the Python graph)
        self.run_plan = True

    def recompile(self):
        # the generated forward becomes _graph_forward; forward runs the graph's C++ plan when
        # it has one (oqfl_ext/nn/plan.py), else _graph_forward
        code = super().recompile()
        cls = type(self)
        if cls is not IntegerGraph:   # fx gives each GraphModule its own class
            cls._graph_forward = cls.forward
            cls.forward = IntegerGraph._forward
        from . import plan
        plan.forget(self)
        return code

    def _forward(self, *args, **kwargs):
        if self.run_plan and len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor \
                and args[0].dtype is torch.float32 and args[0].device.type == "cpu" \
                and not (args[0].requires_grad and torch.is_grad_enabled()) \
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            from . import plan
            p = plan.current(self)
            if isinstance(p, plan.Plan):
                return p(args[0])
        return self._graph_forward(*args, **kwargs)

    def plan_status(self) -> str:
        """Which forward runs on a float32 CPU input: ``"C++ plan of N steps"`` or ``"Python
        graph: <why>"`` (oqfl_ext/nn/plan.py)."""
        from . import plan
        if not self.run_plan:
            return "Python graph: run_plan is False"
        p = plan.current(self)
        if isinstance(p, plan.Plan):
            return f"C++ plan of {p.steps.num_steps()} steps"
        return f"Python graph: {p}"

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        type(res).__name__ = "IntegerGraph"   # GraphModule's copy names its class GraphModule
        res.source = copy.deepcopy(self.source, memo)
        res.fusions = copy.deepcopy(self.fusions, memo)
        res.run_plan = self.run_plan
        return res


# ----------------------------------------------------------------------------------------------
# node patterns

def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_passthrough(gm, node) -> bool:
    """Identity at inference (dropped)."""
    return isinstance(_module(gm, node), (nn.Identity, nn.Dropout))


def _is_batchnorm(gm, node) -> bool:
    m = _module(gm, node)
    return (type(m) is nn.BatchNorm2d and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def _activation(gm, node) -> Optional[Optional[float]]:
    """None: not a fusable activation; otherwise the clamp maximum (``float('inf')`` for a
    plain ReLU, 6.0 for ReLU6)."""
    inf = float("inf")
    m = _module(gm, node)
    if m is not None:
        if type(m) is nn.ReLU:
            return inf
        if isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val > 0.0:
            return float(m.max_val)
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS and len(node.args) == 1:
            return inf
        if node.target is F.relu6 and len(node.args) == 1:
            return 6.0
        if node.target is F.hardtanh:
            args = list(node.args[1:]) + [None] * 2
            lo = node.kwargs.get("min_val", args[0] if args[0] is not None else -1.0)
            hi = node.kwargs.get("max_val", args[1] if args[1] is not None else 1.0)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == 0 \
                    and hi > 0:
                return float(hi)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return inf
    return None


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _add_operands(node) -> Optional[List[fx.Node]]:
    """The two tensor operands of a plain addition node, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        ok_kwargs = not node.kwargs or (set(node.kwargs) == {"alpha"}
                                        and node.kwargs["alpha"] == 1)
    elif node.op == "call_method" and node.target in ("add", "add_"):
        ok_kwargs = not node.kwargs
    else:
        return None
    args = node.args
    if not ok_kwargs or len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        return None
    if args[0] is args[1] or any(a.op == "get_attr" for a in args):
        return None
    return list(args)


def _is_code_passthrough(gm, node) -> bool:
    """Max pooling and flatten: exact on codes (module docstring)."""
    m = _module(gm, node)
    if m is not None:
        return (type(m) is nn.MaxPool2d and not m.return_indices) or type(m) is nn.Flatten
    if node.op == "call_function":
        if node.target is F.max_pool2d:
            return not node.kwargs.get("return_indices", False) and len(node.args) < 7
        return node.target is torch.flatten
    return node.op == "call_method" and node.target == "flatten"


def _pool_arguments(gm, node) -> Optional[dict]:
    """The max pooling arguments of ``node`` (None: it is a flatten)."""
    m = _module(gm, node)
    if type(m) is nn.MaxPool2d:
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode)
    if node.op == "call_function" and node.target is F.max_pool2d:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        out = dict(zip(names, node.args[1:]))
        out.update({k: v for k, v in node.kwargs.items() if k in names})
        return out
    return None


def _pool_on_codes(gm, node) -> None:
    """Make the max pooling ``node`` run :func:`max_pool2d_codes` (flatten works as is)."""
    kwargs = _pool_arguments(gm, node)
    if kwargs is None:
        return
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(max_pool2d_codes, (node.args[0],), kwargs)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def max_pool2d_codes(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                     ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` (same arguments and output size) on uint8 / int8 codes ``[N, C, H,
    W]``, as an element-wise maximum over the kernel's strided views of the input padded with
    the smallest code (which never wins: every window holds an input element). PyTorch's own
    integer max pooling indexes planes in the element type, so it fails beyond 255 (uint8)
    elements per plane. Returns channels_last codes."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    h, w = x.shape[-2:]

    def out_size(n, k, s, p, d):
        span = n + 2 * p - d * (k - 1) - 1
        o = (span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= n + p:   # the last window must start inside
            o -= 1
        return o

    oh, ow = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    need_h, need_w = (oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1
    low = torch.iinfo(x.dtype).min
    pads = (pw, max(0, need_w - w - pw), ph, max(0, need_h - h - ph))
    # no padding (the usual 2x2 / 2 pooling): the views read x itself (F.pad would copy it;
    # the first view is cloned, so the result never aliases x)
    xp = F.pad(x, pads, value=low) if any(pads) else x
    out = None
    for i in range(kh):
        for j in range(kw):
            v = xp[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh,
                   j * dw:j * dw + (ow - 1) * sw + 1:sw]
            out = v.clone(memory_format=torch.channels_last) if out is None \
                else torch.maximum(out, v, out=out)
    return out


def call_sites(gm: fx.GraphModule) -> Dict[str, int]:
    """How many times each submodule is called in the graph."""
    counts: Dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# the rewrite

def plan(gm: fx.GraphModule, int_names: Set[str], can_fold: Callable[[str, str], bool],
         takes_codes: Callable[[str], bool]) -> Dict[str, Fusion]:
    """Rewrite ``gm.graph`` in place as the module docstring says and return the
    :class:`Fusion` of every name in ``int_names`` called exactly once (a layer called at
    several places gets an empty Fusion and keeps float input and output).

    ``can_fold(conv_name, bn_name)``: whether the BatchNorm's values can be folded into the
    conv (the caller does the folding); ``takes_codes(name)``: whether that integer layer can
    take code input. The node of a fused layer keeps the layer's name as its target; its
    arguments become ``(x,)`` or ``(x, residual)``.
    """
    graph = gm.graph
    sites = call_sites(gm)
    fusions = {name: Fusion() for name in int_names}
    fusable = {name for name in int_names if sites.get(name) == 1}

    def int_node(node) -> Optional[str]:
        if node.op == "call_module" and node.target in fusable:
            return node.target
        return None

    def absorb(node: fx.Node, into: fx.Node) -> None:
        node.replace_all_uses_with(into)
        graph.erase_node(node)

    for node in list(graph.nodes):
        if _is_passthrough(gm, node):
            absorb(node, node.args[0])

    for node in list(graph.nodes):
        if not _is_batchnorm(gm, node) or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        name = int_node(src) if isinstance(src, fx.Node) else None
        if name is None or len(src.users) != 1 or not isinstance(
                gm.get_submodule(name), (QuantConv2d, nn.Conv2d)):
            continue
        if fusions[name].bn is None and can_fold(name, node.target):
            fusions[name].bn = node.target
            absorb(node, src)

    for node in list(graph.nodes):
        operands = _add_operands(node)
        if operands is None:
            continue
        for i, src in enumerate(operands):
            name = int_node(src)
            if name is None or len(src.users) != 1 or fusions[name].residual \
                    or len(src.args) != 1:
                continue
            other = operands[1 - i]
            with graph.inserting_before(node):
                fused = graph.call_module(name, (src.args[0], other))
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(src)
            fusions[name].residual = True
            break

    for node in list(graph.nodes):
        top = _activation(gm, node)
        if top is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        name = int_node(src)
        if name is None or len(src.users) != 1:
            continue
        f = fusions[name]
        if f.relu:
            continue
        f.relu = True
        f.clamp_max = None if top == float("inf") else top
        absorb(node, src)

    for node in list(graph.nodes):
        name = int_node(node)
        if name is None:
            continue
        cur, between = node, []
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if _is_code_passthrough(gm, user) and user.args[0] is cur:
                cur = user
                between.append(user)
                continue
            consumer = int_node(user)
            if consumer is not None and user.args[0] is cur and cur not in user.args[1:] \
                    and takes_codes(consumer):
                fusions[name].out_codes = consumer
                fusions[consumer].input_codes = True
                for b in between:
                    _pool_on_codes(gm, b)
            break

    graph.lint()
    gm.recompile()
    return fusions
