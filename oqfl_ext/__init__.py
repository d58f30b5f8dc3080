"""oqfl_ext: learnable low-bit quantization (LSQ) kernels and tools for federated learning.

Importing the package loads the compiled extension ``oqfl_ext._C``, which registers the
``torch.ops.oqfl`` operators, then their fake kernels and autograd formulas.
"""

from __future__ import annotations

import torch


def _load_extension() -> None:
    try:
        from . import _build_info
    except ImportError:
        _build_info = None
    if _build_info is not None and _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"oqfl_ext was built against torch {_build_info.TORCH_VERSION}, but torch "
            f"{torch.__version__} is running. Rebuild it against the installed torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps ."
        )
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except ImportError as error:
        raise ImportError(
            "oqfl_ext's compiled extension (oqfl_ext._C) is missing or cannot be loaded "
            f"({error}). Build it against the installed torch from the repository root: "
            "pip install --no-build-isolation -e ."
        ) from error


_load_extension()

from . import _meta, _autograd  # noqa: E402,F401  (registrations)
from . import ops  # noqa: E402
from . import nn, models  # noqa: E402
from .nn import quantize_model, cost, convert, save_packed, load_packed  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402  (imports onnx only when called)
from ._version import __version__  # noqa: E402

__all__ = ["ops", "nn", "models", "quantize_model", "cost", "convert", "save_packed", "load_packed",
           "export_onnx", "__version__"]
