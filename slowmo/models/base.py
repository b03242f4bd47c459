"""The model registry. A model registers its name, its config (``configs/model/<name>.yaml``), its builder and what
inputs it takes (images, vectors or tokens); a task builds it with the shapes of its data:

    build_model(cfg.model, num_classes=10, input_shape=(3, 32, 32))      # images and vectors
    build_model(cfg.model, vocab_size=32000, pad_id=0)                    # tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..registry import Registry

MODELS = Registry("model", "slowmo.models")


@dataclass
class ModelConfig:
    """The ``model`` section every model's config has."""

    name: str


def build_model(cfg: ModelConfig, **shapes: Any) -> nn.Module:
    """The model of a ``model`` config section, for data of the given shapes."""
    return MODELS[cfg.name].build(cfg, **shapes)


def models_taking(inputs: str) -> list[str]:
    """The registered models that take ``inputs`` (images, vectors or tokens)."""
    return [entry.name for entry in MODELS if inputs in entry.extra["takes"]]
