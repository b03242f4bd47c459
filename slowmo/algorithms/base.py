"""What every base algorithm shares: the communication hooks around the base optimizer's step and the optional split
into nodes (gradients averaged inside a node, the algorithm runs across nodes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..comm import Communicator
from ..flat import FlatParameters, GradientMean
from ..registry import Registry, setting

ALGORITHMS = Registry("algorithm", "slowmo.algorithms")


@dataclass
class AlgorithmConfig:
    """The ``algorithm`` section every base algorithm's config has (``configs/algorithm/<name>.yaml``)."""

    name: str
    procs_per_node: int = setting(minimum=1)  # ranks per node: gradient mean inside a node, the algorithm between nodes

    elastic = False  # whether it runs on dist=torchft: it communicates only at SlowMo's outer steps

    def not_elastic(self) -> str | None:
        """Why this algorithm, so configured, cannot run on dist=torchft, in one line; None when it can."""
        if not self.elastic:
            return "it communicates at every inner step, and torchft's vote comes once per outer step"
        if self.procs_per_node > 1:
            return "procs_per_node > 1 makes a replica of several processes; phase 1 runs one process per replica"
        return None

    def not_in_shards(self) -> str | None:
        """Why this algorithm, so configured, cannot run across sharded replicas (dist.replica_size > 1) on each rank's
        shard, in one line; None when it can."""
        if self.procs_per_node > 1:
            return "a sharded replica is the node, whose ranks average gradients through FSDP (procs_per_node=1)"
        return None


class Algorithm:
    """A base algorithm: the communication of one inner step, around the base optimizer's step, on the model's
    flat parameters (:class:`~slowmo.flat.FlatParameters`: ``self.flat.values`` and ``self.flat.grad``).

    Args:
        comm: the world communicator.
        procs_per_node: ranks per node. With more than one, gradients are averaged inside each node at every step
            (in buckets overlapped with the backward pass, :class:`~slowmo.flat.GradientMean`) and the algorithm
            runs on the ``cross`` group (one rank per node), as the paper's 8-GPU DGX-1 nodes.
    """

    replicas_equal = False  # True: every rank holds the same parameters after every step (no exact average needed)
    averages_gradients = False  # True: the mean gradient over all ranks at every step (over sharded replicas: HSDP)
    bucket_mb = 25.0  # gradient-mean bucket size (MB), as DDP's bucket_cap_mb

    def __init__(self, comm: Communicator, procs_per_node: int = 1) -> None:
        self.comm = comm
        self.procs_per_node = procs_per_node
        if procs_per_node == 1:
            self.node, self.cross = None, comm
        else:
            self.node, self.cross = comm.split_nodes(procs_per_node)
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.flat: FlatParameters | None = None
        self._gradient_mean: GradientMean | None = None

    @classmethod
    def from_config(cls, comm: Communicator, cfg: AlgorithmConfig) -> Algorithm:
        """The algorithm of an ``algorithm`` config section: its fields, but ``name``, are the constructor's."""
        return cls(comm, **{key: value for key, value in asdict(cfg).items() if key != "name"})

    def bind(self, flat: FlatParameters, buffers: list[torch.Tensor]) -> None:
        """Called once by the optimizer: the model's flat parameters and its floating-point buffers (model order)."""
        self.flat, self.params, self.buffers = flat, flat.params, buffers
        if flat.gradients_averaged and not self.averages_gradients:
            raise ValueError(
                f"{type(self).__name__} over sharded replicas: HSDP (ShardedReplicas.shard(model, replicate=True)) "
                "averages the gradients across replicas at every step, for AR-SGD and nothing else"
            )
        group = self.gradient_group()
        if group is not None:
            self._gradient_mean = flat.gradient_mean(group, self.bucket_mb)

    def gradient_group(self) -> Communicator | None:
        """The ranks whose gradients are averaged at every step (default: this rank's node, if any)."""
        return self.node

    def wait_gradients(self) -> None:
        """Complete the gradient mean started during the backward pass (nothing without a gradient group)."""
        if self._gradient_mean is not None:
            self._gradient_mean.wait()

    def before_step(self, step: int) -> None:
        """Communication before the base optimizer's step ``step`` (default: the node's gradient mean)."""
        self.wait_gradients()

    def after_step(self, step: int, outer: bool) -> None:
        """Communication after the base optimizer's step ``step``; ``outer``: an exact average follows."""

    def flush(self) -> None:
        """Complete any in-flight communication and leave the de-biased parameters in the model."""

    def reset_weights(self) -> None:
        """Called after an exact average made every rank's parameters equal (push-sum weights back to 1)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
