"""The forward of an :class:`~oqfl_ext.nn.graph.IntegerGraph` run in C++ (``IntegerPlan``).

At batch 1 the Python between the integer layers (the graph's generated code, each module's
``__call__`` and the op's argument parsing) took 40 to 86 % of a converted network's time
(bench/results/network-cpu-amx-2026-12-04.md). :func:`build` lowers the graph to a list of
steps of the C++ class ``torch.classes.oqfl.IntegerPlan`` (csrc/integer_plan.h): each integer
layer calls the same registered op (``oqfl::qconv2d`` / ``oqfl::qlinear``) with the same
arguments as the layer's own forward; max pooling is a C++ window loop equal to
:func:`oqfl_ext.nn.graph.max_pool2d_codes` on codes and to ATen's kernel on channels_last
float32 (without the indices ATen also computes); adaptive average pooling and flatten call
ATen. So a forward through the plan returns what the graph's Python forward returns, bit for
bit, in one call.

The plan covers the graphs :func:`oqfl_ext.nn.convert` builds for the zoo and for torchvision's
ResNets and MobileNetV2: integer layers, max pooling (float or codes), adaptive average
pooling, flatten, and the zoo's input-shape check (run in Python before the plan). A graph with
anything else (a float layer, an activation or add left unfused, several inputs or outputs)
keeps its Python forward; :meth:`IntegerGraph.plan_status` says which ran and why.

The plan holds the layers' tensors themselves, so it sees in-place changes (``load_state_dict``
copies into them); it is rebuilt when an integer layer gets a new attribute or buffer, or is
moved (``.to()``), when a module on the path to a layer is replaced, or when a pooling or
flatten setting changes (:meth:`Plan.fresh`). Forward hooks on the graph's modules (or global
ones) run only in the Python forward, which then runs.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Tuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from . import integer
from .graph import _pool_arguments, max_pool2d_codes

__all__ = ["PlanUnsupported", "Plan", "build", "current"]


class PlanUnsupported(Exception):
    """The graph has a node the C++ plan does not run (the message names it)."""


class Plan:
    """A built plan: the C++ steps, the Python prologue (input checks) and what it was built
    from (to tell when it is stale)."""

    def __init__(self, steps, prologue: List[Tuple[Callable, tuple]],
                 edges: List[Tuple[nn.Module, str, nn.Module]], targets: List[nn.Module],
                 configs: List[nn.Module], generation: int):
        self.steps = steps
        self.prologue = prologue
        # (weak reference to the parent, name, child) of every edge on the paths from the graph
        # to its call_module targets (a replaced ancestor makes the plan stale too); weak, since
        # a parent may be the graph itself, which keys this plan in _PLANS (a strong reference
        # would keep both alive forever)
        self.edges = [(weakref.ref(parent), name, m) for parent, name, m in edges]
        self.targets = targets          # the call_module targets (whose hooks would run)
        # the pooling / flatten modules the plan copied numbers from, with their extra_repr
        # (their settings are plain attributes that no counter sees)
        self.configs = [(m, m.extra_repr()) for m in configs]
        self.generation = generation    # integer.layer_changes() when it was built

    def fresh(self) -> bool:
        """Whether the graph still holds the modules it was built from, unchanged."""
        if self.generation != integer.layer_changes():
            return False
        for parent_ref, name, m in self.edges:
            parent = parent_ref()
            if parent is None or parent._modules.get(name) is not m:
                return False
        return all(m.extra_repr() == config for m, config in self.configs)

    def hooked(self) -> bool:
        """Whether a forward hook would have to run (the plan cannot run it)."""
        from torch.nn.modules import module as nn_module
        return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks) or \
            any(m._forward_hooks or m._forward_pre_hooks for m in self.targets)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for fn, args in self.prologue:
            fn(x, *args)
        return self.steps.run(x)


# the zoo's input check (oqfl_ext.models._check_image): returns its input or raises, so it
# runs in Python before the plan
def _validators():
    from .. import models
    return {models._check_image}


def _op_call(m) -> dict:
    """The keyword arguments the layer's forward passes to its op: the ones fixed at its
    construction (``_QIntBase._prepare_call``) over the schema's defaults."""
    return {**{a.name: a.default_value for a in m._op._schema.arguments
               if a.has_default_value()}, **m._op_kwargs}


def _conv_ints(m: "integer.QConv2dInt", kw: dict) -> List[int]:
    return [kw["w_bits"], *kw["stride"], *kw["padding"], *kw["dilation"], kw["groups"],
            int(kw["relu"]), kw["x_quant_min"], kw["x_quant_max"], kw["out_quant_min"],
            kw["out_quant_max"], int(m.input_codes)]


def _linear_ints(m: "integer.QLinearInt", kw: dict) -> List[int]:
    return [kw["w_bits"], int(kw["relu"]), kw["x_quant_min"], kw["x_quant_max"],
            kw["out_quant_min"], kw["out_quant_max"], int(m.input_codes)]


def _two(v) -> Tuple[int, int]:
    """An int or a sequence of one or two ints as two ints (as PyTorch's pooling reads them)."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise PlanUnsupported(f"a pooling argument {v!r}")
    return v


def _pool_ints(kwargs: dict, codes: bool) -> List[int]:
    kernel = _two(kwargs["kernel_size"])
    stride = kwargs.get("stride")
    stride = _two(stride if stride not in (None, [], ()) else kernel)
    padding, dilation = _two(kwargs.get("padding", 0)), _two(kwargs.get("dilation", 1))
    return [*kernel, *stride, *padding, *dilation, int(bool(kwargs.get("ceil_mode", False))),
            int(codes)]


def _size2(size) -> List[int]:
    if size is None or isinstance(size, (tuple, list)) and None in size:
        raise PlanUnsupported(f"adaptive average pooling to {size!r}")
    return list(_two(size))


def _flatten_dims(node: fx.Node) -> Tuple[int, int]:
    names = ("start_dim", "end_dim")
    dims = dict(zip(names, (0, -1)))
    dims.update(zip(names, node.args[1:]))
    dims.update({k: v for k, v in node.kwargs.items() if k in names})
    if set(node.kwargs) - set(names):
        raise PlanUnsupported(f"flatten with {sorted(node.kwargs)}")
    return dims["start_dim"], dims["end_dim"]


def build(gm: fx.GraphModule) -> Plan:
    """The plan of ``gm``'s graph, or PlanUnsupported naming the first node it cannot run."""
    steps = torch.classes.oqfl.IntegerPlan()
    slot = {}                  # fx node -> slot of its value
    prologue, edges, targets, configs = [], {}, [], []
    validators = _validators()
    generation = integer.layer_changes()

    def src(a) -> int:
        if not isinstance(a, fx.Node) or a not in slot:
            raise PlanUnsupported(f"an argument {a!r} that is not a tensor of the graph")
        return slot[a]

    def new(node) -> int:
        slot[node] = steps.num_steps() + 1   # step i writes slot i + 1; slot 0 is the input
        return slot[node]

    for node in gm.graph.nodes:
        where = f"node {node.name!r} ({node.op} {node.target})"
        if node.op == "placeholder":
            if slot:
                raise PlanUnsupported("a graph with more than one input")
            slot[node] = 0
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise PlanUnsupported("an output that is not one tensor")
            steps.finish(src(node.args[0]))
        elif node.op == "call_function" and node.target in validators:
            if node.kwargs or not node.args or slot.get(node.args[0]) != 0:
                raise PlanUnsupported(f"{where}: an input check not on the input")
            prologue.append((node.target, tuple(node.args[1:])))
            slot[node] = 0
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            parent: nn.Module = gm
            for name in node.target.split("."):
                child = parent._modules[name]
                edges[(id(parent), name)] = (parent, name, child)
                parent = child
            targets.append(m)
            if not isinstance(m, integer._QIntBase):
                configs.append(m)
            _lower_module(steps, gm, m, node, src, new, where)
        elif node.op == "call_function" and node.target is max_pool2d_codes:
            x = src(node.args[0])
            kwargs = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                              node.args[1:]), **node.kwargs)
            steps.add_max_pool(new(node), x, _pool_ints(kwargs, codes=True))
        elif node.op == "call_function" and node.target is F.max_pool2d:
            kwargs = _pool_arguments(gm, node)
            if node.kwargs.get("return_indices") or len(node.args) > 6:
                raise PlanUnsupported(f"{where}: max pooling returning indices")
            steps.add_max_pool(new(node), src(node.args[0]), _pool_ints(kwargs, codes=False))
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
            steps.add_adaptive_avg_pool(new(node), src(node.args[0]), _size2(size))
        elif (node.op == "call_function" and node.target is torch.flatten) or \
                (node.op == "call_method" and node.target == "flatten"):
            steps.add_flatten(new(node), src(node.args[0]), *_flatten_dims(node))
        else:
            raise PlanUnsupported(where)
    return Plan(steps, prologue, list(edges.values()), targets, configs, generation)


def _lower_module(steps, gm, m: nn.Module, node: fx.Node, src, new, where: str) -> None:
    if isinstance(m, (integer.QConv2dInt, integer.QLinearInt)):
        if node.kwargs or not 1 <= len(node.args) <= 2:
            raise PlanUnsupported(f"{where}: called with {len(node.args)} arguments")
        if m.residual != (len(node.args) == 2):
            raise PlanUnsupported(f"{where}: the residual does not match the layer")
        conv = isinstance(m, integer.QConv2dInt)
        if conv and m._prepad:
            raise PlanUnsupported(f"{where}: a layer that pads its input itself")
        x = src(node.args[0])
        residual = src(node.args[1]) if len(node.args) == 2 else -1
        b, kw = m._buffers, _op_call(m)
        codes_out = m.out_quant_min is not None   # as _QIntBase._run decides
        args = (b["x_scale"], b["x_zero_point"], b["w_packed"], b["w_scale"], b["bias"],
                b["out_scale"] if codes_out else None,
                b["out_zero_point"] if codes_out else None)
        if conv:
            steps.add_qconv(new(node), x, residual, *args, _conv_ints(m, kw), kw["clamp_max"])
        else:
            steps.add_qlinear(new(node), x, residual, *args, _linear_ints(m, kw),
                              kw["clamp_max"])
    elif type(m) is nn.MaxPool2d and not m.return_indices and not node.kwargs \
            and len(node.args) == 1:
        steps.add_max_pool(new(node), src(node.args[0]),
                           _pool_ints(_pool_arguments(gm, node), codes=False))
    elif type(m) is nn.AdaptiveAvgPool2d and len(node.args) == 1:
        steps.add_adaptive_avg_pool(new(node), src(node.args[0]), _size2(m.output_size))
    elif type(m) is nn.Flatten and len(node.args) == 1:
        steps.add_flatten(new(node), src(node.args[0]), m.start_dim, m.end_dim)
    else:
        raise PlanUnsupported(f"{where}: {type(m).__name__}")


# IntegerGraph -> its Plan, or the reason there is none (a str); weak, so that copies and
# pickles of the module never carry the C++ object
_PLANS: "weakref.WeakKeyDictionary[fx.GraphModule, object]" = weakref.WeakKeyDictionary()


def current(gm: fx.GraphModule):
    """``gm``'s Plan (built on first use, rebuilt when stale), or the reason (a str) why its
    graph's Python forward runs instead."""
    got = _PLANS.get(gm)
    if isinstance(got, tuple) and got[1] == integer.layer_changes():
        return got[0]
    if not (isinstance(got, Plan) and got.fresh()):
        try:
            got = build(gm)
        except (PlanUnsupported, RuntimeError) as e:   # RuntimeError: IntegerPlan's checks
            _PLANS[gm] = (str(e), integer.layer_changes())
            return str(e)
        _PLANS[gm] = got
    return "a forward hook is registered (it runs in the Python graph)" if got.hooked() else got


def forget(gm: fx.GraphModule) -> None:
    """Drop ``gm``'s plan (its graph was recompiled)."""
    _PLANS.pop(gm, None)
