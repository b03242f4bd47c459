"""slowmo: communication-efficient distributed training with slow momentum.

opt = slowmo.SlowMo(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                    slowmo.LocalSGD(comm), tau=12, alpha=1.0, beta=0.6)
loss.backward(); opt.step(); opt.zero_grad()
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # plug-ins from outside the tree: <dir on PYTHONPATH>/slowmo/<kind>/

from . import comm, graphs  # noqa: E402
from .algorithms import OSGP, SGP, Algorithm, AllReduce, LocalSGD
from .comm import launch
from .graphs import Complete, DirectedExponential, GossipGraph, Ring
from .inner import DistributedOptimizer
from .outer import SlowMo

__version__ = "0.1.0"

__all__ = [
    "OSGP",
    "SGP",
    "Algorithm",
    "AllReduce",
    "Complete",
    "DirectedExponential",
    "DistributedOptimizer",
    "GossipGraph",
    "LocalSGD",
    "Ring",
    "SlowMo",
    "comm",
    "graphs",
    "launch",
]
