"""ResNets: CIFAR ResNet-20 (He et al. 2016, 3 stages of 3 blocks), its 1-D twin for signals (MNIST-1D: the CIFAR-10
block's model shape, BatchNorm included, at a CPU's cost), ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no
max-pool; the paper's CIFAR-10 model) and ImageNet ResNet-50 (torchvision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..registry import setting
from .base import MODELS, ModelConfig

# convolution, BatchNorm and global average pooling, by the input's spatial dimensions
LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, F.adaptive_avg_pool1d), 2: (nn.Conv2d, nn.BatchNorm2d, F.adaptive_avg_pool2d)}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dims: int = 2) -> None:
        super().__init__()
        conv, norm, _ = LAYERS[dims]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = (
            nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: widths w, 2w, 4w (w = 16 in the original), ``blocks`` basic blocks per stage (3: 6 x 3 + 2 =
    20 layers); ``dims`` = 1 for signals (every convolution and BatchNorm 1-D)."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 3, blocks: int = 3, dims: int = 2):
        super().__init__()
        conv, norm, self.pool = LAYERS[dims]
        self.stem = nn.Sequential(conv(in_channels, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                layers.append(_Block(cin, cout, 2 if stage > 0 and block == 0 else 1, dims))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.layers(self.stem(x)), 1).flatten(1))


@dataclass
class ResNet20Config(ModelConfig):
    width: int = setting(minimum=1)  # w: stage widths w, 2w, 4w (16 in He et al.)


@MODELS.register("resnet20", ResNet20Config, label="ResNet-20", takes=("images",))
def resnet20(cfg: ResNet20Config, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return ResNet20(cfg.width, num_classes, input_shape[0])


@dataclass
class ResNet1DConfig(ModelConfig):
    width: int = setting(minimum=1)  # w: stage widths w, 2w, 4w
    blocks: int = setting(minimum=1)  # basic blocks per stage (3: ResNet-20's depth)


@MODELS.register("resnet1d", ResNet1DConfig, label="1D ResNet", takes=("signals",))
def resnet1d(cfg: ResNet1DConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """ResNet-20's shape on 1-D signals: every convolution and BatchNorm 1-D."""
    return ResNet20(cfg.width, num_classes, input_shape[0], cfg.blocks, dims=1)


@MODELS.register("resnet18", ModelConfig, label="ResNet-18", takes=("images",))
def resnet18(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool): the paper's model."""
    import torchvision  # here, not at the top: importing it costs every digits/WMT rank seconds at start

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@MODELS.register("resnet50", ModelConfig, label="ResNet-50", takes=("images",))
def resnet50(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet stem)."""
    import torchvision

    return torchvision.models.resnet50(num_classes=num_classes)
