"""Quantization-aware training modules built on ``oqfl_ext.ops.fake_quant``.

* :class:`LSQQuantizer`: a learnable step size (per tensor or per channel) and optional offset.
* :class:`QuantConv2d`, :class:`QuantLinear`: drop-in ``nn.Conv2d`` / ``nn.Linear`` with
  quantized weights (signed, per output channel) and inputs (per tensor).
* :func:`quantize_model`: swap every Conv2d/Linear of a model; :func:`quantization_summary`,
  :func:`calibrate`, :func:`set_quantizers_enabled`.
* :func:`cost`: parameter bytes and BitOPs per layer.
* :func:`convert`: a trained model to integer inference (:class:`QConv2dInt`,
  :class:`QLinearInt`, fused into an :class:`IntegerGraph` when the model traces);
  :func:`save_packed` / :func:`load_packed`: its compact file.
"""

from .quantizer import LSQQuantizer, bit_range, MIN_STEP, MAX_STEP, QUANT_DEFAULTS
from .layers import QuantConv2d, QuantLinear
from .quantize import (quantize_model, quantization_summary, calibrate, set_quantizers_enabled,
                       edge_layers, post_training_quantize)
from .bitops import cost, CostReport, LayerCost
from .integer import (QConv2dInt, QLinearInt, convert, save_packed, load_packed,
                      ConversionWarning)
from .graph import IntegerGraph

__all__ = [
    "LSQQuantizer", "bit_range", "MIN_STEP", "MAX_STEP", "QUANT_DEFAULTS", "QuantConv2d", "QuantLinear",
    "quantize_model", "quantization_summary", "calibrate", "set_quantizers_enabled", "edge_layers",
    "post_training_quantize",
    "cost", "CostReport", "LayerCost",
    "QConv2dInt", "QLinearInt", "convert", "save_packed", "load_packed", "ConversionWarning",
    "IntegerGraph",
]
