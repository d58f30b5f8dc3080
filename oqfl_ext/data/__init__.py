"""Dataset loaders that read local files only (no downloads, no pickle)."""

from .idx import read_idx
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN,
                            FASHION_MNIST_STD, fashion_mnist_dir, load_fashion_mnist)
from .cifar10 import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CifarFormatError, cifar10_dir,
                      load_cifar10)
from .digits import DIGITS_MEAN, DIGITS_STD, load_digits
from .partition import partition_dirichlet, partition_iid, partition_shards, partition_stats

__all__ = ["read_idx", "load_fashion_mnist", "fashion_mnist_dir", "FASHION_MNIST_DIR",
           "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "load_cifar10", "cifar10_dir", "CifarFormatError", "CIFAR10_CLASSES", "CIFAR10_MEAN",
           "CIFAR10_STD", "load_digits", "DIGITS_MEAN", "DIGITS_STD",
           "partition_iid", "partition_dirichlet", "partition_shards", "partition_stats"]
