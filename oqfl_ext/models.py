"""A small zoo of CNNs for 28x28 / 32x32 images with 1 or 3 channels (Fashion-MNIST, CIFAR-10).

Every model takes ``in_channels``, ``num_classes`` and ``image_size`` (the side of the square
input it is built for), checks its input shape in ``forward`` (a clear ValueError otherwise;
the check is one call in a ``torch.fx`` graph, so every model traces), and is built from
plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` layers, so
:func:`oqfl_ext.quantize_model` can quantize it. ``create(name, ...)`` builds one by name.

========================  ==================================================================
``small_cnn``             3 conv (BN, ReLU, two max-pools) + 1 linear; ``width`` 16 by default
``vgg``                   VGG-style: 3 stages of two 3x3 conv + max-pool, two linear layers
``resnet20``              ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks,
                          16/32/64 channels, 1x1-conv shortcuts where the shape changes
``mobilenet_v2``          MobileNetV2-style: inverted residual blocks (expansion, depthwise
                          3x3, linear projection) sized for small images
========================  ==================================================================

:data:`ARGUMENT_RANGES` bounds every constructor argument of a model a packed file
(:func:`oqfl_ext.nn.save_packed` / :func:`~oqfl_ext.nn.load_packed`) may describe, and
:func:`layer_sizes` gives the weight and BatchNorm sizes a description implies without building
it: a loader checks a file against them before it builds anything.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Mapping, Tuple, Type

import torch
from torch import Tensor, nn

from ._checks import check_int

__all__ = ["SmallCNN", "VGG", "ResNet20", "MobileNetV2", "MODELS", "create", "ARGUMENT_RANGES",
           "check_arguments", "layer_sizes"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum)


def _check_image(x: Tensor, channels: int, size: int, model: str) -> Tensor:
    """``x`` when its shape is ``(N, channels, size, size)``, else a ValueError."""
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{model}: input expected shape (N, {channels}, {size}, {size}), "
                         f"got {tuple(x.shape)}")
    return x


# a single call in a torch.fx graph (it reads the input's shape), so the models trace
torch.fx.wrap("_check_image")


class _ImageClassifier(nn.Module):
    """Argument checks and the input-shape check shared by the zoo."""

    min_image_size = 8

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.num_classes = _positive_int("num_classes", num_classes, 2)
        self.image_size = _positive_int("image_size", image_size, self.min_image_size)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(_check_image(x, self.in_channels, self.image_size,
                                          type(self).__name__))

    def _forward(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1,
                  relu6: bool = False, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True) if relu6 else nn.ReLU(inplace=True))


class SmallCNN(_ImageClassifier):
    """conv3x3(width) - conv3x3(width) - maxpool - conv3x3(2*width) - maxpool - linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 16):
        super().__init__(in_channels, num_classes, image_size)
        w = _positive_int("width", width)
        self.features = nn.Sequential(
            _conv_bn_relu(self.in_channels, w), _conv_bn_relu(w, w), nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w), nn.MaxPool2d(2))
        side = self.image_size // 4
        self.classifier = nn.Linear(2 * w * side * side, self.num_classes)

    def _forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    @staticmethod
    def _layer_sizes(in_channels, num_classes, image_size, width=16):
        w, side = width, image_size // 4
        return [("conv", in_channels * w * 9), ("bn", w), ("conv", w * w * 9), ("bn", w),
                ("conv", w * 2 * w * 9), ("bn", 2 * w),
                ("linear", 2 * w * side * side * num_classes)]


class VGG(_ImageClassifier):
    """Three stages of two conv3x3-BN-ReLU and a max-pool (width, 2*width, 4*width channels),
    then linear(hidden) - ReLU - linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 width: int = 32, hidden: int = 256):
        super().__init__(in_channels, num_classes, image_size)
        w = _positive_int("width", width)
        hidden = _positive_int("hidden", hidden)
        layers, cin = [], self.in_channels
        for cout in (w, 2 * w, 4 * w):
            layers += [_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        side = self.image_size // 8
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, self.num_classes))

    def _forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    @staticmethod
    def _layer_sizes(in_channels, num_classes, image_size, width=32, hidden=256):
        out, cin = [], in_channels
        for cout in (width, 2 * width, 4 * width):
            out += [("conv", cin * cout * 9), ("bn", cout), ("conv", cout * cout * 9),
                    ("bn", cout)]
            cin = cout
        side = image_size // 8
        return out + [("linear", cin * side * side * hidden), ("linear", hidden * num_classes)]


class BasicBlock(nn.Module):
    """Two conv3x3-BN with a ReLU between, added to the (1x1-conv projected) input, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(_ImageClassifier):
    """ResNet-20: conv3x3(16), 3 stages of 3 basic blocks (16, 32, 64 channels; strides 1, 2,
    2), global average pool, linear."""

    min_image_size = 4

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 blocks_per_stage: int = 3):
        super().__init__(in_channels, num_classes, image_size)
        n = _positive_int("blocks_per_stage", blocks_per_stage)
        self.conv1 = nn.Conv2d(self.in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def _layer_sizes(in_channels, num_classes, image_size, blocks_per_stage=3):
        out, cin = [("conv", in_channels * 16 * 9), ("bn", 16)], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                out += [("conv", cin * cout * 9), ("bn", cout), ("conv", cout * cout * 9),
                        ("bn", cout)]
                if (stride if i == 0 else 1) != 1 or cin != cout:
                    out += [("conv", cin * cout), ("bn", cout)]
                cin = cout
        return out + [("linear", 64 * num_classes)]


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6), depthwise 3x3 (ReLU6), linear 1x1 projection; residual when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [_conv_bn_relu(cin, hidden, relu6=True, kernel=1)]
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden, relu6=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(_ImageClassifier):
    """MobileNetV2-style network for small images: a stride-1 conv3x3(32) stem, inverted
    residual stages (expansion, channels, blocks, stride) = (1,16,1,1), (6,24,2,1), (6,32,2,2),
    (6,64,2,2), (6,96,1,1), a 1x1 conv to ``last_channels``, average pool, linear."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 last_channels: int = 320):
        super().__init__(in_channels, num_classes, image_size)
        last = _positive_int("last_channels", last_channels)
        layers, cin = [_conv_bn_relu(self.in_channels, 32, relu6=True)], 32
        for t, c, n, s in self.STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu(cin, last, relu6=True, kernel=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, self.num_classes)

    def _forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    @classmethod
    def _layer_sizes(cls, in_channels, num_classes, image_size, last_channels=320):
        out, cin = [("conv", in_channels * 32 * 9), ("bn", 32)], 32
        for t, c, n, _ in cls.STAGES:
            for _ in range(n):
                hidden = cin * t
                if t != 1:
                    out += [("conv", cin * hidden), ("bn", hidden)]
                out += [("conv", hidden * 9), ("bn", hidden), ("conv", hidden * c), ("bn", c)]
                cin = c
        return out + [("conv", cin * last_channels), ("bn", last_channels),
                      ("linear", last_channels * num_classes)]


MODELS: Dict[str, Type[_ImageClassifier]] = {
    "small_cnn": SmallCNN, "vgg": VGG, "resnet20": ResNet20, "mobilenet_v2": MobileNetV2,
}


def create(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
           **kwargs) -> nn.Module:
    """Build the zoo model ``name`` (one of ``MODELS``) for the given input."""
    if name not in MODELS:
        raise ValueError(f"name expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes,
                        image_size=image_size, **kwargs)


# The range of every constructor argument (of any model of the zoo) that a packed model file
# may describe: generous for the images the zoo is built for, small enough that no file can
# make a loader build an absurd network.
ARGUMENT_RANGES: Dict[str, Tuple[int, int]] = {
    "in_channels": (1, 64), "num_classes": (2, 100_000), "image_size": (4, 1024),
    "width": (1, 1024), "hidden": (1, 65_536), "blocks_per_stage": (1, 64),
    "last_channels": (1, 8192),
}


def check_arguments(name: str, kwargs: Mapping[str, object]) -> None:
    """ValueError unless ``create(name, **kwargs)`` names a zoo model and every argument is one
    of its constructor's, an integer within :data:`ARGUMENT_RANGES` (and ``image_size`` at
    least the model's smallest)."""
    if name not in MODELS:
        raise ValueError(f"name expected one of {sorted(MODELS)}, got {name!r:.80}")
    cls = MODELS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key, value in kwargs.items():
        if key not in accepted:
            raise ValueError(f"{key!r:.80} is not an argument of oqfl_ext.models.create("
                             f"{name!r}) (it takes {', '.join(accepted)})")
        lo, hi = ARGUMENT_RANGES[key]
        if key == "image_size":
            lo = cls.min_image_size
        check_int(key, value, minimum=lo, maximum=hi)


def layer_sizes(name: str, **kwargs) -> List[Tuple[str, int]]:
    """What ``create(name, **kwargs)`` holds, computed without building it: for each
    ``Conv2d``, ``BatchNorm2d`` and ``Linear`` in module order, ``("conv", weight numel)``,
    ``("bn", channels)`` or ``("linear", weight numel)``. The arguments are checked first
    (:func:`check_arguments`)."""
    check_arguments(name, kwargs)
    cls = MODELS[name]
    full = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self"}
    full.update({p.name: p.default for p in inspect.signature(create).parameters.values()
                 if p.default is not p.empty})
    full.update(kwargs)
    return cls._layer_sizes(**full)
