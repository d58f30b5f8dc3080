"""Centralized training on real data: the small CNN at W4A4 (quantize_model's defaults: 4-bit
weights and inputs, 8-bit first and last layers) ends within 2 points of its float twin trained
the same way on Fashion-MNIST (the Debian package's files).

Same initial weights, the same 5000 training images in the same order, 4 epochs of SGD with
momentum and a cosine schedule; accuracy on the 10000 test images. About 20 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import oqfl_ext
from oqfl_ext import models
from oqfl_ext.data import fashion_mnist_dir, load_fashion_mnist

pytestmark = pytest.mark.skipif(
    fashion_mnist_dir() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

TRAIN, EPOCHS, BATCH, LR = 5000, 4, 64, 0.01


def _train_and_evaluate(quantized: bool, data) -> float:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = models.SmallCNN(in_channels=1, image_size=28)
    if quantized:
        model = oqfl_ext.quantize_model(model, weight_bits=4, act_bits=4, first_last_bits=8)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    steps = EPOCHS * -(-TRAIN // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(TRAIN, generator=order)
        for i in range(0, TRAIN, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 1000):
            correct += (model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
    return correct / len(x_test)


def test_w4a4_within_two_points_of_float():
    data = (*load_fashion_mnist("train", limit=TRAIN, normalize=True),
            *load_fashion_mnist("test", normalize=True))
    float_acc = _train_and_evaluate(False, data)
    quant_acc = _train_and_evaluate(True, data)
    print(f"\nFashion-MNIST, {TRAIN} images x {EPOCHS} epochs: float {float_acc:.4f}, "
          f"W4A4 {quant_acc:.4f}")
    assert float_acc > 0.83, float_acc  # the float twin learned something
    assert quant_acc >= float_acc - 0.02, (float_acc, quant_acc)
