"""What every base algorithm shares: the communication hooks around the base optimizer's step, flat buffers,
and the optional split into nodes (gradients averaged inside a node, the algorithm runs across nodes)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..comm import Communicator


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D copy of ``tensors``, in order."""
    if not tensors:
        return torch.empty(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (inverse of :func:`flatten`)."""
    offset = 0
    for t in tensors:
        t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_(comm: Communicator, tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its mean over the ranks of ``comm`` (one all-reduce of a flat buffer)."""
    if tensors:
        flat = flatten(tensors)
        comm.all_reduce(flat, "mean")
        unflatten_(flat, tensors)


def gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the trainable ``params``; a missing gradient becomes zeros, so every rank reduces the
    same buffer (a parameter unused on one rank contributes 0 to the mean, as in DDP)."""
    grads = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    return grads


class Algorithm:
    """A base algorithm: the communication of one inner step, around the base optimizer's step.

    Args:
        comm: the world communicator.
        procs_per_node: ranks per node. With more than one, gradients are averaged inside each node at every step
            and the algorithm runs on the ``cross`` group (one rank per node), as the paper's 8-GPU DGX-1 nodes.
    """

    def __init__(self, comm: Communicator, procs_per_node: int = 1) -> None:
        self.comm = comm
        self.procs_per_node = procs_per_node
        if procs_per_node == 1:
            self.node, self.cross = None, comm
        else:
            self.node, self.cross = comm.split_nodes(procs_per_node)
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []

    def bind(self, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        """Called once by the optimizer: the model's parameters and floating-point buffers, in model order."""
        self.params, self.buffers = params, buffers

    def before_step(self, step: int) -> None:
        """Communication before the base optimizer's step ``step`` (default: the node's gradient mean)."""
        if self.node is not None:
            average_(self.node, gradients(self.params))

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
