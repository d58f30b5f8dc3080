"""Dataset loaders that read local files only (no downloads, no pickle)."""

from .idx import read_idx
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN,
                            FASHION_MNIST_STD, fashion_mnist_dir, load_fashion_mnist)
from .partition import partition_dirichlet, partition_iid, partition_shards, partition_stats

__all__ = ["read_idx", "load_fashion_mnist", "fashion_mnist_dir", "FASHION_MNIST_DIR",
           "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "partition_iid", "partition_dirichlet", "partition_shards", "partition_stats"]
