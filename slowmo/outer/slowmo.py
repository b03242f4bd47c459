"""SlowMo: the base algorithm's inner steps, and every ``tau`` of them an outer step built from parts
(:mod:`slowmo.outer.parts`): the mean of the pseudo-gradients Delta_i = x_{t,0} - x^i_{t,tau}, their clipping, the
update of x_{t,0}, fragment by fragment. With the default parts (:class:`~slowmo.outer.algorithm1.SlowMomentum`,
:class:`~slowmo.outer.exact.ExactMean`, one fragment, no clipping) it is Algorithm 1, bit for bit.

One outer path for every combination: after an inner step that ends a round (k + 1 = 0 mod tau) the base algorithm
completes what it has in flight (OSGP's last messages); the fragments due launch (their mean starts), the fragments
due merge (the mean completes, is clipped, the update gives x_{t+1,0}, which goes into x_{t,0} and the model, mixed);
at the end of a round the buffers (BatchNorm statistics) are averaged. One fragment, no delay: launch and merge are
the same step, in place on the model's buffer, and the push-sum weights are reset to 1 (every rank then holds the same
model). After a merge the base optimizer's state of the merged parameters is kept, reset or averaged
(``base_buffers``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ..algorithms import Algorithm
from ..flat import average_
from ..inner import DistributedOptimizer
from ..shard import Shard
from .algorithm1 import SlowMomentum, check
from .clip import ClipNorm
from .exact import ExactMean
from .fragments import Flight, Fragments, layers_of
from .parts import Mean, Parts, Piece, Update

BASE_BUFFERS = ("keep", "reset", "average")


class SlowMo(DistributedOptimizer):
    """Slow momentum on top of a base algorithm: one call to :meth:`step` is one inner step; every ``tau``-th is
    followed by the outer step.

    Args:
        params, base_optimizer, algorithm: as :class:`~slowmo.DistributedOptimizer`.
        tau: inner steps per outer iteration.
        update: the outer update (default :class:`~slowmo.SlowMomentum`: Algorithm 1, alpha = 1, beta = 0, which gives
            back the base algorithm with an exact average every tau steps; the paper tunes beta in 0.4-0.8); or
            :class:`~slowmo.TorchUpdate` (any torch optimizer), or a preset's (:mod:`slowmo.outer.presets`).
        mean: how the pseudo-gradients are averaged (default :class:`~slowmo.ExactMean`;
            :class:`~slowmo.ShardedMean`, :class:`~slowmo.CompressedMean`, :class:`~slowmo.EagerMean`).
        fragments: :class:`~slowmo.Fragments` (default: one, no delay: the whole model at once).
        clip: :class:`~slowmo.ClipNorm` of the mean pseudo-gradient, or None.
        base_buffers: "keep", "reset" or "average" the base optimizer's state at each outer step.
        state_device: where the outer state lives (x_{t,0}, the update's and the mean's state, and a copy of the
            model that the outer step works on): None, with the parameters; "cpu", in host memory, as prime offloads
            it, so that a GPU holds nothing of the outer step between outer steps (page-locked when the parameters
            are on a GPU). The outer step then copies each fragment's parameters there at its launch and its merge, and
            x_{t+1,0} back; the numbers are the same, bit for bit. (Given the parameters' own device, the state has
            its buffers there: on a CPU run, one copy of the model more.)
    """

    FORMAT = "slowmo/2"  # the outer state as parts

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
        tau: int = 12,
        update: Update | None = None,
        mean: Mean | None = None,
        fragments: Fragments | None = None,
        clip: ClipNorm | None = None,
        base_buffers: Literal["keep", "reset", "average"] = "keep",
        state_device: str | torch.device | None = None,
    ) -> None:
        check(tau=tau)
        if base_buffers not in BASE_BUFFERS:
            raise ValueError(f"base_buffers must be 'keep', 'reset' or 'average', got {base_buffers!r}")
        parts = Parts(tau, update or SlowMomentum(), mean or ExactMean(), fragments or Fragments(), clip)
        parts.check()
        layers = layers_of(params) if isinstance(params, nn.Module) else None
        self.parts, self.clip = parts, clip
        self.update, self.mean, self.fragments = parts.update, parts.mean, parts.fragments
        super().__init__(params, base_optimizer, algorithm)
        self.tau, self.base_buffers = tau, base_buffers
        self.fragments.bind(layers or list(range(len(self._params))), tau)
        self._shard = Shard(self.comm, self.flat.numel, self.mean.shards_state)
        self._staged = self.flat.data  # the model as the outer step works on it: the buffer, or its host copy
        if state_device is not None:  # (its own buffers even on the parameters' device: a CPU run tests this path)
            data = self.flat.data
            pinned = data.is_cuda and torch.device(state_device).type == "cpu"
            self._staged = torch.empty(data.numel(), dtype=data.dtype, device=state_device, pin_memory=pinned)
        self._gammas: list[float] | None = None  # gamma_{t-1} of each parameter (at its last outer step)
        self._outer = 0

    @property
    def outer_step(self) -> int:
        """Number of outer iterations completed (t)."""
        return self._outer

    def _flat_multiple(self) -> int:
        return self.comm.world_size if self.mean.shards_state else 1  # the sharded state: m slices of equal length

    def _start(self) -> None:
        super()._start()  # every rank now holds rank 0's parameters: x_{0,0}
        self._stage(None, to_state=True)
        self.update.bind(self._shard.mine(self._staged))
        self.mean.bind(self.flat.numel, self._staged)

    def _stage(self, ranges: list[tuple[int, int]] | None, to_state: bool) -> None:
        """With the outer state on another device: the model's ``ranges`` (None: all of it) into its copy there
        (``to_state``), or back."""
        if self._staged is self.flat.data:
            return
        source, target = (self.flat.data, self._staged) if to_state else (self._staged, self.flat.data)
        for a, b in ranges or [(0, self.flat.numel)]:
            target[a:b].copy_(source[a:b])

    def _ends_outer_iteration(self) -> bool:
        return (self._step + 1) % self.tau == 0

    @torch.no_grad()
    def _after_inner_step(self, outer: bool) -> None:
        step = self._step - 1
        if outer:
            self.algorithm.flush()  # OSGP's messages in flight, taken in before any mean
        due = self.fragments.due(step)
        gammas = self._scaled_gammas() if due else []
        for fragment in due:
            self._launch(fragment, step, gammas)
        buffers = [b.clone() for b in self._buffers] if outer and self.comm.elastic else None  # kept for a failed vote
        if outer:
            average_(self.comm, self._buffers)
        committed = True
        for fragment in self.fragments.ready(step):
            flight = self.fragments.in_flight.pop(fragment)
            if self.comm.commit():
                self._merge(flight)
            else:
                self._discard(flight, buffers)
                committed = False
        if outer and committed:
            self._outer += 1

    def _scaled_gammas(self) -> list[float]:
        """Each parameter's gamma_t; the scaled pseudo-gradient divides by it, so it must be > 0."""
        gammas = self.learning_rates()
        if self.update.pseudo_gradient == "scaled" and min(gammas) <= 0:
            raise ValueError(
                f"SlowMo divides by the base lr at the outer step, but it is {min(gammas)} at inner step "
                f"{self._step}; keep the lr schedule above 0 (e.g. start warm-up above 0)"
            )
        return gammas

    def _launch(self, fragment: int, step: int, gammas: list[float]) -> None:
        members = self.fragments.members[fragment]
        flight = self._flight(fragment, step, [gammas[i] for i in members])
        self._stage(None if flight.whole else flight.ranges, to_state=True)
        self.mean.start(flight)
        self.fragments.in_flight[fragment] = flight

    def _flight(self, fragment: int, step: int, gammas: list[float]) -> Flight:
        members, whole = self.fragments.members[fragment], self.fragments.whole
        equal = self.algorithm.replicas_equal  # every rank holds the same x (AllReduce): nothing to average
        flat, x0 = self.flat, self.update.x0
        return Flight(
            fragment,
            step,
            members,
            flat.ranges,
            flat.rows,
            gammas,
            whole,
            x0,
            self._staged,
            self._shard,
            self.comm,
            equal,
        )

    def _merge(self, flight: Flight) -> None:
        """The fragment's mean completed, clipped; its update (which sets x_{t,0} to x_{t+1,0}); x_{t+1,0}, mixed, into
        the model."""
        self.mean.finish(flight)
        if not flight.whole:  # (the model moved on since the launch: its values now, for the mix)
            self._stage(flight.ranges, to_state=True)
        pieces = self._pieces(flight)
        if not (flight.averaged and self.clip is None and self.update.step_from_average(pieces)):
            if flight.averaged:  # Delta_bar = x_{t,0} - x_{t,tau}
                for piece in pieces:
                    torch.sub(self.update.x0[piece.start : piece.end], piece.delta, out=piece.delta)
            if self.clip is not None:
                self.clip.clip_(flight.values, ((self.comm,) if self._shard.enabled else ()) + self.flat.whole_over)
            self.update.step(pieces)
        model, mix = self._shard.mine(self._staged), self.fragments.mix
        for piece in pieces:
            x = model[piece.start : piece.end]
            if x.data_ptr() == piece.delta.data_ptr():  # the update worked on the model itself
                continue
            if mix == 1.0:
                x.copy_(piece.delta)
            else:  # x_p <- alpha_mix x~_p + (1 - alpha_mix) x_p
                x.mul_(1.0 - mix).add_(piece.delta, alpha=mix)
        if flight.whole:
            self._gammas = list(flight.gammas)
            self._shard.gather_(self._staged)
            self._stage(None, to_state=False)
            self.algorithm.reset_weights()  # every rank holds the same model: push-sum's weights back to 1
            self._base_state_(self.base_buffers)
        else:
            self._stage(flight.ranges, to_state=False)
            gammas = self._gammas or self.learning_rates()
            for i, gamma in zip(flight.members, flight.gammas, strict=True):
                gammas[i] = gamma
            self._gammas = gammas
            self._base_state_(self.base_buffers, [self._params[i] for i in flight.members])

    def _discard(self, flight: Flight, buffers: list[torch.Tensor] | None) -> None:
        """A failed vote (dist=torchft: a replica was lost during the round): the round is discarded. The model goes
        back to x_{t,0} (the fragment's parameters) and the buffers to their values before the round's average; u,
        x_{t,0}, gamma and t stay as they were, and the base optimizer's state as the inner steps left it."""
        self.mean.finish(flight)  # (nothing of the failed mean is used)
        x0, model = self.update.x0, self._shard.mine(self.flat.data)
        for a, b in flight.ranges:
            model[a:b].copy_(x0[a:b])
        for buffer, saved in zip(self._buffers, buffers or [], strict=False):
            buffer.copy_(saved)

    def _pieces(self, flight: Flight) -> list[Piece]:
        """One piece per member parameter, in the outer state's coordinates: cut to this rank's slice for the whole
        model (whose ``values`` are in those coordinates), packed one after the other for a fragment."""
        previous = (self._gammas or flight.gammas) if flight.whole else None
        pieces, offset, start, end = [], 0, self._shard.start, self._shard.start + self._shard.length
        for i, (a, b), gamma in zip(flight.members, flight.ranges, flight.gammas, strict=True):
            if flight.whole:
                if a < end and b > start:
                    lo, hi = max(a, start) - start, min(b, end) - start
                    pieces.append(Piece(lo, hi, gamma, previous[i], flight.values[lo:hi]))
            else:
                last = self._gammas[i] if self._gammas is not None else gamma
                pieces.append(Piece(a, b, gamma, last, flight.values[offset : offset + b - a]))
                offset += b - a
        return pieces

    def synchronize(self) -> None:
        self._settle()
        super().synchronize()

    def _settle(self) -> None:
        """Complete every mean in flight (the numbers are the same as when they complete later)."""
        self.mean.settle(self.comm.world_size)
        for flight in self.fragments.in_flight.values():
            self.mean.finish(flight)

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        self._settle()
        state = super().state_dict()
        state["outer"] = {
            "t": self._outer,
            "gammas": self._gammas,
            "shard": self._shard.key,
            "numel": self.flat.whole_numel,
            "parts": self._kinds(),
            "update": self.flat.per_parameter(self.update.state_dict()),
            "mean": self.flat.per_parameter(self.mean.state_dict()),
            "fragments": self.fragments.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        outer = state_dict["outer"]
        if outer["numel"] != self.flat.whole_numel or outer["shard"] != self._shard.key:
            raise ValueError(
                f"the checkpoint's SlowMo state is for {outer['numel']} parameters sharded as "
                f"{outer['shard']}, this run has {self.flat.whole_numel} sharded as {self._shard.key}; "
                "resume with the same model, world size and mean (slowmo/mean=exact or sharded)"
            )
        if outer["parts"] != self._kinds():
            raise ValueError(
                f"the checkpoint's outer step is {outer['parts']}, this run's is {self._kinds()}; resume with the "
                "same parts, or start a new run directory"
            )
        like = self._staged
        self._outer, self._gammas = outer["t"], outer["gammas"]
        self.update.load_state_dict(self.flat.flat_layout(outer["update"]), like)
        self.mean.load_state_dict(self.flat.flat_layout(outer["mean"]), like)
        self.fragments.in_flight = {}
        for fragment, saved in outer["fragments"].items():
            flight = self._flight(int(fragment), saved["step"], saved["gammas"])
            flight.values = saved["values"].to(dtype=like.dtype, device=like.device).clone()
            self.fragments.in_flight[int(fragment)] = flight

    def _kinds(self) -> dict[str, str]:
        return {"update": type(self.update).__name__, "mean": type(self.mean).__name__}

    def __repr__(self) -> str:
        parts = ", ".join(repr(p) for p in (self.update, self.mean, self.fragments, self.clip) if p is not None)
        names = f"{type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__}"
        return f"SlowMo({names}, tau={self.tau}, {parts})"
