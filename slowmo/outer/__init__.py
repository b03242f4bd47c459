"""SlowMo's outer step, built from parts (:mod:`.parts`): Algorithm 1's update alone in :mod:`.algorithm1`, any torch
optimizer as the update (:mod:`.torch_update`), the exact, sharded, compressed (a scale per 256 values or per row)
or eager mean (:mod:`.exact`, :mod:`.sharded`, :mod:`.compressed`, :mod:`.compressed_rows`, :mod:`.eager`),
fragments (:mod:`.fragments`), clipping (:mod:`.clip`), the presets (:mod:`.presets`) and the optimizer that puts
them together (:mod:`.slowmo`). A new part is one module here
plus its YAML file (``configs/slowmo/update/<name>.yaml`` or ``configs/slowmo/mean/<name>.yaml``); a directory on
``PYTHONPATH`` holding ``slowmo/outer/<name>.py`` adds one from outside the source tree."""

from pkgutil import extend_path

from . import presets
from .algorithm1 import SlowMomentum
from .clip import ClipNorm
from .compressed import CompressedMean
from .compressed_rows import RowCompressedMean
from .eager import EagerMean
from .exact import ExactMean
from .fragments import Fragments, layers_of
from .parts import MEANS, UPDATES, Parts
from .sharded import ShardedMean
from .slowmo import SlowMo
from .torch_update import TorchUpdate

__path__ = extend_path(__path__, __name__)

__all__ = [
    "MEANS",
    "UPDATES",
    "ClipNorm",
    "CompressedMean",
    "EagerMean",
    "ExactMean",
    "RowCompressedMean",
    "ShardedMean",
    "Fragments",
    "Parts",
    "SlowMo",
    "SlowMomentum",
    "TorchUpdate",
    "layers_of",
    "presets",
]
