"""slowmo: communication-efficient distributed training with slow momentum.

opt = slowmo.SlowMo(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                    slowmo.LocalSGD(comm), tau=12, update=slowmo.SlowMomentum(alpha=1.0, beta=0.6))
loss.backward(); opt.step(); opt.zero_grad()

The outer step's parts: the update (SlowMomentum, TorchUpdate, or slowmo.presets.bmuf/lookahead/diloco), the mean
(ExactMean, ShardedMean, CompressedMean, RowCompressedMean, EagerMean), Fragments and ClipNorm.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # plug-ins from outside the tree: <dir on PYTHONPATH>/slowmo/<kind>/

from . import comm, graphs  # noqa: E402
from .algorithms import OSGP, SGP, Algorithm, AllReduce, LocalSGD
from .comm import launch
from .graphs import Complete, DirectedExponential, GossipGraph, Ring
from .inner import DistributedOptimizer
from .outer import (
    ClipNorm,
    CompressedMean,
    EagerMean,
    ExactMean,
    Fragments,
    RowCompressedMean,
    ShardedMean,
    SlowMo,
    SlowMomentum,
    TorchUpdate,
    presets,
)

__version__ = "0.1.0"

__all__ = [
    "OSGP",
    "SGP",
    "Algorithm",
    "AllReduce",
    "ClipNorm",
    "Complete",
    "CompressedMean",
    "DirectedExponential",
    "DistributedOptimizer",
    "EagerMean",
    "ExactMean",
    "RowCompressedMean",
    "ShardedMean",
    "Fragments",
    "GossipGraph",
    "LocalSGD",
    "Ring",
    "SlowMo",
    "SlowMomentum",
    "TorchUpdate",
    "comm",
    "graphs",
    "launch",
    "presets",
]
