"""Fashion-MNIST (Xiao et al. 2017) from the idx files of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .idx import read_idx
from .._checks import check_int

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN",
           "FASHION_MNIST_STD", "fashion_mnist_dir", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# mean and standard deviation of the 60000 training images' pixels, scaled to [0, 1]
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def fashion_mnist_dir(root=None) -> Optional[Path]:
    """The folder holding the four idx files: ``root``, else ``$OQFL_FASHION_MNIST``, else the
    Debian package's folder; None when the training images are not there."""
    folder = _folder(root)
    return folder if _find(folder, _FILES["train"][0]) is not None else None


def _folder(root) -> Path:
    return Path(root or os.environ.get("OQFL_FASHION_MNIST") or FASHION_MNIST_DIR)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(split: str = "train", root=None, limit: Optional[int] = None,
                       normalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a Fashion-MNIST split (``"train"``: 60000, ``"test"``: 10000).

    ``images``: uint8 ``[N, 28, 28]``, or with ``normalize`` float32 ``[N, 1, 28, 28]`` scaled
    to [0, 1] and standardized with the training set's mean and std. ``labels``: int64 ``[N]``
    in 0..9. ``limit`` keeps the first ``limit`` examples (file order). ``root``: see
    :func:`fashion_mnist_dir`. FileNotFoundError says how to install the data when missing.
    """
    if split not in _FILES:
        raise ValueError(f"split expected 'train' or 'test', got {split!r}")
    check_int("limit", limit, minimum=1, allow_none=True)
    folder = _folder(root)
    paths = [_find(folder, stem) for stem in _FILES[split]]
    if any(p is None for p in paths):
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({', '.join(_FILES[split])}[.gz]) not found in "
            f"{folder}; install the Debian package (apt-get install dataset-fashion-mnist) or "
            "set OQFL_FASHION_MNIST to a folder holding them")
    images, labels = (read_idx(p) for p in paths)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected uint8 images of shape (N, 28, 28), got "
                         f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"{paths[1]}: expected {images.shape[0]} uint8 labels, got "
                         f"{labels.dtype} {labels.shape}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]}: labels expected in 0..9, got {int(labels.max())}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(labels.astype(np.int64))
    if normalize:
        x = ((x.float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)
    return x, y
