"""Models: small nets for the embedded digits task, CIFAR ResNets, ResNet-50, and fairseq-shaped Transformers."""

from .resnet import build_resnet
from .small import build_small
from .transformer import TRANSFORMER_SHAPES, Transformer

__all__ = ["TRANSFORMER_SHAPES", "Transformer", "build_resnet", "build_small"]
