"""The 8x8 handwritten digits (UCI optdigits test set, 1797 images, 10 classes) bundled with
scikit-learn (``sklearn.datasets.load_digits`` reads a CSV shipped inside the package: no
download, no pickle): a tiny dataset for fast federated runs and tests.

There is no official train/test split; :func:`load_digits` makes a stratified one from a seed,
the same on every machine (it uses its own :func:`numpy.random.default_rng`, not scikit-learn's
splitters, so it does not change with scikit-learn's version).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import torch

from .._checks import check_int

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DIGITS_TEST_FRACTION", "load_digits"]

# mean and standard deviation of the training split's pixels (default seed and test fraction),
# scaled to [0, 1] (raw values are 0..16)
DIGITS_MEAN = 0.3055
DIGITS_STD = 0.3761
DIGITS_TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _raw() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a pinned dependency
        raise ImportError("load_digits needs scikit-learn (pip install scikit-learn), which "
                          "ships the 8x8 digits data") from e
    d = _sk_load_digits()
    images = np.asarray(d.images)
    labels = np.asarray(d.target)
    if images.shape[1:] != (8, 8) or labels.shape != images.shape[:1]:
        raise ValueError(f"scikit-learn's digits have an unexpected shape: {images.shape}, "
                         f"{labels.shape}")
    if images.min() < 0 or images.max() > 16 or np.any(images != np.round(images)):
        raise ValueError("scikit-learn's digits expected integer pixel values in 0..16")
    images = images.astype(np.uint8)
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays, each sorted: per class, ``round(test_fraction * n_c)``
    samples drawn by a seeded permutation go to the test split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", limit: Optional[int] = None, normalize: bool = False, *,
                test_fraction: float = DIGITS_TEST_FRACTION,
                seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a split of scikit-learn's 8x8 digits (same form as
    :func:`oqfl_ext.data.load_fashion_mnist`).

    The 1797 images are split per class: a ``test_fraction`` share of each class (rounded)
    goes to ``"test"``, the rest to ``"train"`` (with the defaults: 1438 and 359 images), chosen
    by ``numpy.random.default_rng(seed)``; each split keeps the data set's order.

    ``images``: uint8 ``[N, 8, 8]`` with values 0..16, or with ``normalize`` float32
    ``[N, 1, 8, 8]`` scaled to [0, 1] (divided by 16) and standardized with
    :data:`DIGITS_MEAN` / :data:`DIGITS_STD`. ``labels``: int64 ``[N]`` in 0..9. ``limit``
    keeps the first ``limit`` examples of the split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split expected 'train' or 'test', got {split!r}")
    check_int("limit", limit, minimum=1, allow_none=True)
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
            or not 0 < test_fraction < 1):
        raise ValueError(f"test_fraction expected a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
            0 <= seed < 2 ** 63):
        raise ValueError(f"seed expected an integer in [0, 2**63), got {seed!r}")
    images, labels = _raw()
    train, test = _split(labels, float(test_fraction), int(seed))
    idx = (train if split == "train" else test)[:limit]
    x = torch.from_numpy(images[idx])  # fancy indexing copies: writable
    y = torch.from_numpy(labels[idx])
    if normalize:
        x = ((x.float() / 16 - DIGITS_MEAN) / DIGITS_STD).unsqueeze(1)
    return x, y
