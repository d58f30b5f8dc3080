"""ONNX export of a converted integer model (docs/DESIGN.md section 7.3).

:func:`export_onnx` writes the graph of a model built by :func:`oqfl_ext.convert` (an
:class:`~oqfl_ext.nn.IntegerGraph`, or a layer-by-layer conversion that ``torch.fx`` can trace)
as an ONNX model that computes what the package's integer layers compute:

* input quantization ``clamp(round_half_even(x / x_scale + zero_point), qmin, qmax)``:
  ``QuantizeLinear`` (``Div`` + ``Add`` + ``QuantizeLinear`` with scale 1 when the zero point
  is not 0, so that the sum is rounded once, in float32, as the op does) and ``Clip`` on the
  codes when the range is narrower than 8 bits;
* the integer accumulation: ``ConvInteger`` / ``MatMulInteger`` on uint8 activations (signed
  codes shifted by +128 with their zero point, as the CPU kernel does; the accumulation does not
  change) and int8 weight codes; where ONNX Runtime's u8 x s8 kernels could saturate an int16
  pair sum (``2 * max activation code * max |weight code| > 32767``) the weights are stored as
  uint8 with zero point 128 instead, which its kernels accumulate exactly;
* the float32 epilogue, one ONNX op per rounded float operation: ``Cast`` of the int32
  accumulator, ``Mul`` by ``float32(x_scale * w_scale[o])``, ``Add`` of the bias, ``Add`` of the
  residual, ``Relu`` / ``Clip`` (ReLU6); output codes for the next layer are quantized as above;
* float nodes as their ONNX ops (pooling, flatten, activations, adds, an unfolded BatchNorm,
  Conv2d / Linear layers that ``quantize_model`` kept in float).

Weight codes of 2..4 bits are stored as ONNX ``INT4`` initializers (opset 21) widened to int8 by a
``Cast`` node (``ConvInteger`` / ``MatMulInteger`` take 8-bit operands only), so the file keeps
the packed size; ``int4_weights=False`` stores them as int8.

Only ``onnx`` is needed to export (``pip install oqfl_ext[onnx]`` also installs ONNX Runtime to
run the result). The file is protobuf, no pickle.
"""

from __future__ import annotations

import operator
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from . import models as _zoo
from . import ops
from ._io import atomic_write_bytes
from .nn import QConv2dInt, QLinearInt, QuantConv2d, QuantLinear
from .nn.graph import GraphUnsupported, max_pool2d_codes, trace

__all__ = ["export_onnx", "OPSET", "IR_VERSION"]

OPSET = 21        # INT4 initializers and Cast from INT4 (ONNX 1.16, ONNX Runtime 1.18+)
IR_VERSION = 10   # the IR of opset 21, read by every ONNX Runtime that runs it

# ONNX Runtime's u8 x s8 GEMM kernels without VNNI sum two products in a saturating int16
_INT16_MAX = 32767


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx package: pip install onnx (or "
                          "pip install 'oqfl_ext[onnx]', which adds onnxruntime)") from e
    return onnx


class _Builder:
    """Nodes and initializers of the ONNX graph, with unique names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.h = onnx.helper
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, array) -> str:
        """An initializer holding ``array`` (numpy or a CPU tensor)."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def int4_const(self, hint: str, codes: Tensor) -> str:
        """An INT4 initializer of the int8 ``codes`` (two per byte, the first in the low nibble:
        the layout of docs/DESIGN.md section 3.1, which is ONNX's)."""
        name = self.name(hint)
        raw = ops.pack(codes.detach().cpu().contiguous(), 4).numpy().tobytes()
        self.inits.append(self.h.make_tensor(name, self.onnx.TensorProto.INT4,
                                             list(codes.shape), raw, raw=True))
        return name

    def op(self, op_type: str, inputs: List[str], hint: Optional[str] = None,
           out: Optional[str] = None, **attrs) -> str:
        out = out or self.name(hint or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Value:
    """An ONNX tensor standing for an fx node's value: float32, or codes held as uint8 with
    ``shift`` (128 for the int8 codes of signed activations, 0 for uint8 ones)."""

    def __init__(self, name: str, shift: Optional[int] = None):
        self.name, self.shift = name, shift


class _Emitter(fx.Interpreter):
    """Runs the graph on the example input and emits each node's ONNX counterpart."""

    def __init__(self, gm: fx.GraphModule, b: _Builder, dynamic_batch: bool,
                 int4_weights: bool):
        super().__init__(gm)
        self.b = b
        self.dynamic_batch = dynamic_batch
        self.int4_weights = int4_weights
        self.values: Dict[fx.Node, _Value] = {}
        self.inputs: list = []
        self.outputs: list = []

    # -- helpers ---------------------------------------------------------------------------

    def _where(self, n: fx.Node) -> str:
        if n.op == "call_module":
            kind = type(self.module.get_submodule(n.target)).__name__
            return f"node {n.name!r} (module {n.target!r}, {kind})"
        return f"node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)})"

    def _arg(self, n: fx.Node, a) -> _Value:
        if not isinstance(a, fx.Node) or a not in self.values:
            raise ValueError(f"export_onnx: {self._where(n)}: argument {a!r} is not a tensor "
                             "computed by the graph")
        return self.values[a]

    def _float(self, n: fx.Node, a) -> str:
        v = self._arg(n, a)
        if v.shift is not None:
            raise ValueError(f"export_onnx: {self._where(n)}: expected a float input, got codes")
        return v.name

    def _shape(self, value: Tensor) -> list:
        dims = list(value.shape)
        if self.dynamic_batch and dims:
            dims[0] = "N"
        return dims

    def _quantize(self, x: str, scale: Tensor, zero_point: int, lo: int, hi: int) -> _Value:
        """Codes ``clamp(round_half_even(x / scale + zero_point), lo, hi)`` of the float ``x``
        (lo, hi in the signed domain when lo < 0), as uint8 shifted into 0..255."""
        b = self.b
        shift = 128 if lo < 0 else 0
        s = scale.detach().float().cpu().reshape(())
        if zero_point == 0:
            q = b.op("QuantizeLinear", [x, b.const("scale", s),
                                        b.const("zp", torch.tensor(shift, dtype=torch.uint8))])
        else:
            # x / s + z rounded once in float32, as the op computes it, then rounded to a code
            t = b.op("Div", [x, b.const("scale", s)])
            t = b.op("Add", [t, b.const("zp_f", torch.tensor(float(zero_point)))])
            q = b.op("QuantizeLinear", [t, b.const("one", torch.tensor(1.0)),
                                        b.const("zp", torch.tensor(shift, dtype=torch.uint8))])
        if (lo + shift, hi + shift) != (0, 255):
            q = b.op("Clip", [q, b.const("lo", torch.tensor(lo + shift, dtype=torch.uint8)),
                              b.const("hi", torch.tensor(hi + shift, dtype=torch.uint8))])
        return _Value(q, shift)

    # -- the integer layers ----------------------------------------------------------------

    def _int_layer(self, n: fx.Node, m, x_arg, residual_arg) -> _Value:
        b = self.b
        lname = n.target
        lo, hi = m.x_quant_min, m.x_quant_max
        shift = 128 if m.act_signed else 0
        zp = int(m.x_zero_point.item())
        if m.input_codes:
            q = self._arg(n, x_arg)
            if q.shift != shift:
                raise ValueError(f"export_onnx: {self._where(n)}: input codes of another "
                                 "domain than the layer's")
        else:
            x = self._float(n, x_arg)
            if isinstance(m, QConv2dInt) and m.takes_codes() is False:
                x = self._pad(n, m, x)
            q = self._quantize(x, m.x_scale, zp, lo, hi)
        codes = m.weight_codes().detach().cpu()
        if isinstance(m, QLinearInt):
            codes = codes.t().contiguous()           # MatMulInteger's B is [IC, OC]
        wmax = 2 ** (m.code_bits - 1)
        x_zp = b.const("x_zp", torch.tensor(zp + shift, dtype=torch.uint8))
        if 2 * (hi + shift) * wmax > _INT16_MAX:
            # u8 x u8 (weights + 128, zero point 128): accumulated without saturation
            w = b.const(f"{lname}.w", (codes.to(torch.int16) + 128).to(torch.uint8))
            ins = [q.name, w, x_zp, b.const("w_zp", torch.tensor(128, dtype=torch.uint8))]
        elif m.w_bits == 4 and self.int4_weights:
            w = b.op("Cast", [b.int4_const(f"{lname}.w4", codes)], f"{lname}.w",
                     to=self.b.onnx.TensorProto.INT8)
            ins = [q.name, w, x_zp]
        else:
            ins = [q.name, b.const(f"{lname}.w", codes), x_zp]
        if isinstance(m, QConv2dInt):
            ph, pw = (0, 0) if m.takes_codes() is False else _pair(m.padding)
            kh, kw = m.kernel_size
            acc = b.op("ConvInteger", ins, f"{lname}.acc", kernel_shape=[kh, kw],
                       strides=list(m.stride), pads=[ph, pw, ph, pw],
                       dilations=list(m.dilation), group=m.groups)
            bshape = (1, -1, 1, 1)
        else:
            acc = b.op("MatMulInteger", ins, f"{lname}.acc")
            bshape = (-1,)
        # the op's epilogue (docs/DESIGN.md section 7.1), each float32 operation on its own
        v = b.op("Cast", [acc], to=b.onnx.TensorProto.FLOAT)
        mult = (m.x_scale.float() * m.w_scale.float()).reshape(bshape)
        v = b.op("Mul", [v, b.const(f"{lname}.mult", mult)])
        if m.bias is not None:
            v = b.op("Add", [v, b.const(f"{lname}.bias", m.bias.float().reshape(bshape))])
        if m.residual:
            v = b.op("Add", [v, self._float(n, residual_arg)])
        if m.relu and m.clamp_max is not None:
            v = b.op("Clip", [v, b.const("zero", torch.tensor(0.0)),
                              b.const("clamp_max", torch.tensor(float(m.clamp_max)))])
        elif m.relu:
            v = b.op("Relu", [v])
        elif m.clamp_max is not None:
            v = b.op("Min", [v, b.const("clamp_max", torch.tensor(float(m.clamp_max)))])
        if m.out_quant is None:
            return _Value(v)
        return self._quantize(v, m.out_scale, int(m.out_zero_point.item()), m.out_quant_min,
                              m.out_quant_max)

    def _pad(self, n: fx.Node, m, x: str) -> str:
        """The float padding of a conv whose padding the op does not do (a padding mode other
        than zeros, or a string padding): nn.Conv2d's own rule."""
        kh, kw = m.kernel_size
        if m.padding == "same":
            pads = []
            for d, k in zip(m.dilation, (kh, kw)):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        elif m.padding == "valid":
            pads = [(0, 0), (0, 0)]
        else:
            pads = [(p, p) for p in _pair(m.padding)]
        mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                "circular": "wrap"}.get(m.padding_mode)
        if mode is None:
            raise ValueError(f"export_onnx: {self._where(n)}: padding_mode "
                             f"{m.padding_mode!r} has no ONNX Pad mode")
        (t, bo), (le, r) = pads
        onnx_pads = torch.tensor([0, 0, t, le, 0, 0, bo, r], dtype=torch.int64)
        return self.b.op("Pad", [x, self.b.const("pads", onnx_pads)], mode=mode)

    # -- the other nodes -------------------------------------------------------------------

    def _float_conv(self, n: fx.Node, m: nn.Conv2d, x: str) -> str:
        """A layer ``quantize_model`` kept in float (e.g. ``overrides={name: None}``)."""
        kh, kw = m.kernel_size
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            x = self._pad(n, m, x)
            ph = pw = 0
        else:
            ph, pw = m.padding
        ins = [x, self.b.const(f"{n.target}.weight", m.weight.detach().float())]
        if m.bias is not None:
            ins.append(self.b.const(f"{n.target}.bias", m.bias.detach().float()))
        return self.b.op("Conv", ins, kernel_shape=[kh, kw], strides=list(m.stride),
                         pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups)

    def _max_pool(self, n: fx.Node, x: _Value, kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False, return_indices=False) -> _Value:
        if ceil_mode or return_indices:
            raise ValueError(f"export_onnx: {self._where(n)}: max pooling with ceil_mode or "
                             "return_indices is not exported")
        kh, kw = _pair(kernel_size)
        sh, sw = _pair(stride if stride not in (None, [], ()) else kernel_size)
        ph, pw = _pair(padding)
        out = self.b.op("MaxPool", [x.name], kernel_shape=[kh, kw], strides=[sh, sw],
                        pads=[ph, pw, ph, pw], dilations=list(_pair(dilation)))
        return _Value(out, x.shift)

    def _flatten(self, n: fx.Node, x: _Value, start_dim=0, end_dim=-1) -> _Value:
        rank = self.env[n.args[0]].dim()
        if start_dim != 1 or end_dim not in (-1, rank - 1):
            raise ValueError(f"export_onnx: {self._where(n)}: only flatten(start_dim=1, "
                             f"end_dim=-1) is exported, got ({start_dim}, {end_dim})")
        return _Value(self.b.op("Flatten", [x.name], axis=1), x.shift)

    def _clip(self, x: str, lo: float, hi: float) -> str:
        return self.b.op("Clip", [x, self.b.const("lo", torch.tensor(float(lo))),
                                  self.b.const("hi", torch.tensor(float(hi)))])

    def _emit(self, n: fx.Node, value) -> Optional[_Value]:
        b = self.b
        args, kwargs = n.args, n.kwargs
        if n.op == "placeholder":
            if not isinstance(value, Tensor) or value.dtype != torch.float32:
                raise ValueError("export_onnx: example_input expected a float32 tensor")
            name = n.name
            self.inputs.append(b.h.make_tensor_value_info(name, b.onnx.TensorProto.FLOAT,
                                                          self._shape(value)))
            return _Value(name)
        if n.op == "output":
            out = args[0]
            if not isinstance(out, fx.Node) or not isinstance(value, Tensor) or \
                    value.dtype != torch.float32:
                raise ValueError("export_onnx: the model's output expected one float32 tensor")
            name = self._float(n, out)
            final = b.op("Identity", [name], out="output")
            self.outputs.append(b.h.make_tensor_value_info(final, b.onnx.TensorProto.FLOAT,
                                                           self._shape(value)))
            return None
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if isinstance(m, (QConv2dInt, QLinearInt)):
                residual = args[1] if len(args) > 1 else kwargs.get("residual")
                return self._int_layer(n, m, args[0], residual)
            if isinstance(m, (QuantConv2d, QuantLinear)):
                raise ValueError(f"export_onnx: {self._where(n)}: a fake-quant layer "
                                 "(convert kept it: a float side, a disabled quantizer or an "
                                 "offset outside the code domain, see its ConversionWarning); "
                                 "only integer layers are exported")
            x = self._arg(n, args[0])
            t = type(m)
            if t is nn.MaxPool2d:
                return self._max_pool(n, x, m.kernel_size, m.stride, m.padding, m.dilation,
                                      m.ceil_mode, m.return_indices)
            if t is nn.Flatten:
                return self._flatten(n, x, m.start_dim, m.end_dim)
            if t in (nn.Identity, nn.Dropout):
                return x
            if t is nn.ReLU:
                return _Value(b.op("Relu", [self._float(n, args[0])]))
            if isinstance(m, nn.Hardtanh):   # ReLU6 too
                return _Value(self._clip(self._float(n, args[0]), m.min_val, m.max_val))
            if t is nn.AdaptiveAvgPool2d and _pair(m.output_size) == (1, 1):
                return _Value(b.op("GlobalAveragePool", [self._float(n, args[0])]))
            if t is nn.Conv2d:
                return _Value(self._float_conv(n, m, self._float(n, args[0])))
            if t is nn.Linear:
                y = b.op("MatMul", [self._float(n, args[0]),
                                    b.const(f"{n.target}.weight", m.weight.detach().float().t())])
                if m.bias is not None:
                    y = b.op("Add", [y, b.const(f"{n.target}.bias", m.bias.detach().float())])
                return _Value(y)
            if t is nn.BatchNorm2d and m.running_mean is not None and not m.training:
                c = m.num_features
                ones, zeros = torch.ones(c), torch.zeros(c)
                w = m.weight.detach().float() if m.weight is not None else ones
                bb = m.bias.detach().float() if m.bias is not None else zeros
                return _Value(b.op("BatchNormalization", [
                    self._float(n, args[0]), b.const(f"{n.target}.weight", w),
                    b.const(f"{n.target}.bias", bb),
                    b.const(f"{n.target}.mean", m.running_mean.detach().float()),
                    b.const(f"{n.target}.var", m.running_var.detach().float())],
                    epsilon=float(m.eps)))
            raise ValueError(f"export_onnx: {self._where(n)}: no ONNX mapping for this module "
                             "(exported: the integer layers, float Conv2d/Linear, max pooling, "
                             "global average pooling, flatten, ReLU/ReLU6, BatchNorm2d, "
                             "Identity/Dropout)")
        if n.op in ("call_function", "call_method"):
            f = n.target
            if n.op == "call_function" and getattr(f, "__module__", None) == _zoo.__name__ \
                    and args and isinstance(args[0], fx.Node) \
                    and value is self.env.get(args[0]):
                # the zoo's input-shape check returns its input: the ONNX input's shape says it
                return self._arg(n, args[0])
            if f in (max_pool2d_codes, F.max_pool2d):
                return self._max_pool(n, self._arg(n, args[0]), *args[1:], **kwargs)
            if f in (torch.flatten, "flatten"):
                return self._flatten(n, self._arg(n, args[0]), *args[1:], **kwargs)
            if f in (F.relu, torch.relu, "relu") and len(args) == 1:
                return _Value(b.op("Relu", [self._float(n, args[0])]))
            if f is F.relu6 and len(args) == 1:
                return _Value(self._clip(self._float(n, args[0]), 0.0, 6.0))
            if f in (operator.add, operator.iadd, torch.add, "add", "add_") and \
                    len(args) == 2 and all(isinstance(a, fx.Node) for a in args) and \
                    not kwargs:
                return _Value(b.op("Add", [self._float(n, a) for a in args]))
            if f is F.adaptive_avg_pool2d and len(args) == 2 and _pair(args[1]) == (1, 1):
                return _Value(b.op("GlobalAveragePool", [self._float(n, args[0])]))
            if f == "contiguous":
                return self._arg(n, args[0])
        raise ValueError(f"export_onnx: {self._where(n)}: no ONNX mapping for this operation")

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        v = self._emit(n, value)
        if v is not None:
            if isinstance(value, Tensor) and (v.shift is not None) != (
                    value.dtype in (torch.uint8, torch.int8)):  # pragma: no cover - invariant
                raise RuntimeError(f"export_onnx: {self._where(n)}: code/float mismatch")
            self.values[n] = v
        return value


def export_onnx(model: nn.Module, path, example_input: Tensor, *, dynamic_batch: bool = True,
                int4_weights: bool = True, opset: int = OPSET):
    """Write the integer model ``model`` (from :func:`oqfl_ext.convert`) as an ONNX file.

    The ONNX graph computes what ``model`` computes (module docstring; docs/DESIGN.md section
    7.3): the same input codes, the same exact integer accumulation and the same float32
    epilogue, operation by operation.

    Args:
        model: an :class:`~oqfl_ext.nn.IntegerGraph`, or a model converted layer by layer
            (``convert(..., fuse=False)``) that ``torch.fx`` can trace. Every quantized layer
            must be an integer layer (a fake-quant layer that ``convert`` kept is an error).
        path: the ``.onnx`` file to write (atomically).
        example_input: a float32 input (``[N, C, H, W]``) on the model's device; it is run once
            through ``model`` to follow the graph, and fixes the ONNX input's shape.
        dynamic_batch: the ONNX input's and output's first dimension is symbolic (``N``).
        int4_weights: store 2..4-bit weight codes as ``INT4`` initializers (widened by a
            ``Cast``); False: as int8.
        opset: the ONNX opset, at least 21 (INT4 tensors, ``Cast`` from INT4).

    Returns:
        The ``onnx.ModelProto`` written (checked by ``onnx.checker``): one float32 input named
        after ``forward``'s argument (``x`` for the zoo and torchvision), one float32 output
        named ``output``.

    Raises:
        ImportError: the ``onnx`` package is not installed.
        ValueError: an argument is invalid, or the model holds an operation or a layer with no
            ONNX mapping here (the message names the graph node and the module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dtype != torch.float32:
        got = example_input.dtype if isinstance(example_input, Tensor) else \
            type(example_input).__name__
        raise ValueError(f"example_input expected a float32 tensor, got {got}")
    for name, v in (("dynamic_batch", dynamic_batch), ("int4_weights", int4_weights)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} expected True or False, got {v!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < OPSET:
        raise ValueError(f"opset expected an int >= {OPSET}, got {opset!r}")
    onnx = _onnx()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        if not any(isinstance(m, (QConv2dInt, QLinearInt)) for m in model.modules()):
            raise ValueError("model expected a model converted by oqfl_ext.convert (it has no "
                             "integer layer)")
        try:
            gm = trace(model)
        except GraphUnsupported as e:
            raise ValueError(f"export_onnx: {e}") from None
    was_training = gm.training
    gm.eval()
    b = _Builder(onnx)
    em = _Emitter(gm, b, dynamic_batch, int4_weights)
    try:
        with torch.no_grad():
            em.run(example_input)
    finally:
        gm.train(was_training)
    graph = b.h.make_graph(b.nodes, type(model).__name__, em.inputs, em.outputs,
                           initializer=b.inits)
    proto = b.h.make_model(graph, opset_imports=[b.h.make_opsetid("", opset)],
                           producer_name="oqfl_ext")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    atomic_write_bytes(os.fspath(path), proto.SerializeToString())
    return proto
