"""Streaming fragments (Douillard et al., Streaming DiLoCo, arXiv 2501.18512): the outer step one fragment of the
model at a time, its all-reduce overlapped with the following inner steps (``slowmo.fragments`` = P,
``slowmo.sync_delay`` = d, ``slowmo.fragment_mix`` = alpha_mix).

The model's layers (each module owning a weight, with the normalizations after it, in order: :func:`layers_of`;
each parameter is a layer when SlowMo is given a list of tensors) are dealt into P fragments in a strided pattern,
layer l to fragment l mod P, so that every fragment spans the whole depth (the paper's strided fragments).
Fragment p has its own outer iterations:

    launch after inner step k when (k + 1) mod tau = p tau / P:
        Delta_p = mean_i (x_{0,p} - x^i_p)              an asynchronous all-reduce, gamma_p = the base lr now
    merge after inner step k + d, the all-reduce complete:
        x~_p = the outer step on (x_{0,p}, Delta_p)       (outer_optimizer, alpha, beta, as for the whole model)
        x^i_p <- alpha_mix x~_p + (1 - alpha_mix) x^i_p  (the d local steps taken meanwhile, mixed in)
        x_{0,p} <- x~_p

so each fragment is synchronized once every tau inner steps, and a step sends at most one fragment's bytes (peak
bytes per step fall by P for fragments of equal size, as a Transformer's blocks; by |theta| / |largest fragment| in
general). P = 1, d = 0, alpha_mix = 1 is Algorithm 1 (SlowMo then runs its usual path, bit for
bit). BatchNorm-style buffers are averaged every tau steps (when fragment 0 launches). The base algorithm must be
Local SGD or AR-SGD: push-sum weights belong to a rank's whole model, not to a fragment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comm import Communicator
from .comm.base import Work


def layers_of(model: nn.Module) -> list[int]:
    """The layer index of each of ``model.parameters()``. A layer is a module that owns a weight (a parameter of 2
    or more dimensions: a convolution, a linear map, an embedding) together with the modules owning only vectors
    (normalizations, biases) that follow it before the next weight, so that a BatchNorm travels with its
    convolution; vectors before the first weight join the first layer."""
    layers: list[int] = []
    current = -1
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.dim() >= 2 for p in own):
            current += 1
        layers.extend([max(current, 0)] * len(own))
    return layers


@dataclass
class InFlight:
    """A fragment's launched synchronization: its step, the buffer being all-reduced (then the mean), the base lrs
    at launch (per parameter of the fragment) and the pending all-reduce."""

    start: int
    delta: torch.Tensor
    gammas: list[float]
    work: Work | None
    summed: bool  # ``delta`` holds the sum over the ranks, not yet divided

    def complete(self, world_size: int) -> torch.Tensor:
        """Wait for the all-reduce; ``delta`` is then the mean pseudo-gradient of the fragment."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.summed:
            self.delta.div_(world_size)
            self.summed = False
        return self.delta


class Fragments:
    """Which parameters are in which fragment, when each one launches, and the launched ones not yet merged."""

    def __init__(self, layers: list[int], count: int, tau: int, delay: int) -> None:
        if max(layers) + 1 < count:
            raise ValueError(
                f"fragments={count} but the model has {max(layers) + 1} layers with parameters; use at most that many"
            )
        self.count, self.tau, self.delay = count, tau, delay
        self.members = [[i for i, layer in enumerate(layers) if layer % count == p] for p in range(count)]
        self.in_flight: dict[int, InFlight] = {}

    def due(self, step: int) -> list[int]:
        """The fragments that launch after inner step ``step``: (k + 1) mod tau = p tau / P."""
        return [p for p in range(self.count) if (step + 1) % self.tau == p * self.tau // self.count]

    def launch(
        self,
        fragment: int,
        step: int,
        x0: torch.Tensor,
        x: torch.Tensor,
        ranges: list[tuple[int, int]],
        gammas: list[float],
        comm: Communicator,
        equal: bool,
    ) -> None:
        """Start averaging x_{0,p} - x^i_p over the ranks (nothing to send when the replicas are ``equal``)."""
        members = self.members[fragment]
        delta = torch.cat([x0[a:b] - x[a:b] for a, b in (ranges[i] for i in members)])
        work = None if equal else comm.all_reduce_async(delta)
        self.in_flight[fragment] = InFlight(step, delta, [gammas[i] for i in members], work, summed=not equal)

    def ready(self, step: int) -> list[int]:
        """The launched fragments to merge after inner step ``step`` (launched d steps before)."""
        return [p for p in sorted(self.in_flight) if self.in_flight[p].start + self.delay == step]

    def complete(self, world_size: int) -> None:
        """Complete every launched fragment's all-reduce (the same numbers as when merged later)."""
        for flight in self.in_flight.values():
            flight.complete(world_size)

    def state_dict(self, world_size: int) -> dict[int, dict]:
        """The launched fragments, their all-reduces completed."""
        self.complete(world_size)
        return {
            p: {"start": f.start, "delta": f.delta.clone(), "gammas": list(f.gammas)} for p, f in self.in_flight.items()
        }

    def load_state_dict(self, state: dict[int, dict], like: torch.Tensor) -> None:
        self.in_flight = {
            int(p): InFlight(
                f["start"], f["delta"].to(dtype=like.dtype, device=like.device).clone(), f["gammas"], None, False
            )
            for p, f in state.items()
        }
