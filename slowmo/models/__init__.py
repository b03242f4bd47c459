"""Models, registered by name in :data:`MODELS`: small nets for the embedded tasks, CIFAR ResNets, ResNet-50, and
fairseq-shaped Transformers (a new model is one module here plus ``configs/model/<name>.yaml``)."""

from pkgutil import extend_path

from .base import MODELS, ModelConfig, build_model, models_taking
from .resnet import ResNet20
from .transformer import Transformer

__path__ = extend_path(__path__, __name__)
__all__ = ["MODELS", "ModelConfig", "ResNet20", "Transformer", "build_model", "models_taking"]
