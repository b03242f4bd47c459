"""SlowMo (Wang, Tantia, Ballas & Rabbat, ICLR 2020): Algorithm 1 over any base algorithm. Paper -> this file:

    u_0 = 0; x_{0,0} the same on every rank            _start: broadcast by DistributedOptimizer, u = 0
    for k = 0 .. tau-1: x_{t,k+1} = x_{t,k} - gamma_t d_{t,k}   DistributedOptimizer.step (algorithm + base step)
    x_{t,tau} = (1/m) sum_i x^i_{t,tau}                 _outer_step: flush in-flight gossip, Shard.mean_
                                                        (skipped when the ranks hold equal replicas: AllReduce)
    u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}) / gamma_t   _outer_step: v (below) = Delta + m v
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}         _outer_step: x_{t,0} - alpha v, into the model

u is kept in parameter units, v_t = gamma_{t-1} u_t, which makes steps 3-4 a momentum step on the pseudo-gradient
Delta = x_{t,0} - x_{t,tau}: v_{t+1} = m v_t + Delta with m = beta gamma_t / gamma_{t-1}, x_{t+1,0} = x_{t,0} -
alpha v_{t+1}, done in place in 4 passes over |theta|; with alpha = 1 (the paper's), the identity x_{t+1,0} =
x_{t,tau} - m v_t (slow momentum as an extrapolation from the average) needs 3. gamma_t is the lr of each parameter's
base param group at the outer step. ``nesterov=True``: x_{t+1,0} = x_{t,0} - alpha gamma_t (beta u_{t+1} + Delta /
gamma_t) (DiLoCo's form). ``pseudo_gradient="raw"`` (BMUF's and DiLoCo's convention): u_{t+1} = beta u_t + Delta,
x_{t+1,0} = x_{t,0} - alpha u_{t+1}, alpha an absolute lr (v = u); the two agree under a constant gamma. Buffers
(BatchNorm statistics) are averaged with x, push-sum weights reset; the base optimizer's state is then kept, reset
or averaged (``base_buffers``). Presets: :mod:`slowmo.presets`; the sharded state: :mod:`slowmo.shard`.

Beyond Algorithm 1 (each off by default, and then the path above runs unchanged): with G = Delta_bar / gamma_t and
lr alpha gamma_t (raw: G = Delta_bar, lr alpha), Delta_bar the mean pseudo-gradient,
- ``outer_optimizer="nesterov"`` / ``"adam"``: torch's SGD with Nesterov momentum beta / Adam with betas (beta,
  adam_beta2) steps x_{t,0} along G (DiLoCo's outer Nesterov; outer Adam);
- ``clip_norm=c``: Delta_bar <- Delta_bar min(1, c / ||Delta_bar||_2) first;
- ``compression`` and ``error_feedback``: Delta_bar is the two-phase compressed mean of Delta_i + e_i
  (:mod:`slowmo.compress`);
- ``eager=True``: Delta_bar is replaced by (Delta_i^t + sum_{j != i} Delta_j^{t-1}) / m, the all-reduce of round t
  overlapping round t + 1 (Kale, Douillard & Donchev 2025);
- ``fragments``, ``sync_delay``, ``fragment_mix``: the outer step per fragment, staggered and overlapped
  (Streaming DiLoCo, :mod:`slowmo.streaming`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from .algorithms import Algorithm, AllReduce, LocalSGD
from .comm.base import Work
from .compress import Codec, compressed_mean_
from .flat import average_
from .inner import DistributedOptimizer
from .presets import Presets, check_settings
from .shard import Shard
from .streaming import Fragments, layers_of


class SlowMo(Presets, DistributedOptimizer):
    """Slow momentum on top of a base algorithm: one call to :meth:`step` is one inner step; every ``tau``-th is
    followed by the outer step.

    Args:
        params, base_optimizer, algorithm: as :class:`~slowmo.DistributedOptimizer`.
        tau: inner steps per outer iteration. alpha: slow learning rate (the paper: 1). beta: slow momentum in
            [0, 1) (the paper tunes it in 0.4-0.8); alpha=1, beta=0 gives back the base algorithm with an exact
            average every tau steps. nesterov: the Nesterov form of the outer update.
        base_buffers: "keep", "reset" or "average" the base optimizer's state at each outer step.
        shard_outer_state: keep u and x_{t,0} for this rank's 1/m of the parameters only (same result).
        pseudo_gradient: "scaled" (SlowMo's) or "raw" (BMUF's and DiLoCo's).
        outer_optimizer: "sgd" (Algorithm 1's closed form), "nesterov" or "adam" (torch's, on the pseudo-gradient);
            adam_beta2, adam_eps: Adam's (default 0.999, 1e-8). clip_norm: max L2 norm of the mean pseudo-gradient.
        compression: "none", "fp16", "bf16", "int8", "fp8" or "fp4": the format of the outer average;
            error_feedback: add each rank's last encoding error to its next pseudo-gradient.
        eager: overlap the outer all-reduce with the next outer iteration (eager updates).
        fragments, sync_delay, fragment_mix: streaming fragments P, their delay d and mixing factor.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
        tau: int = 12,
        alpha: float = 1.0,
        beta: float = 0.0,
        nesterov: bool = False,
        base_buffers: Literal["keep", "reset", "average"] = "keep",
        shard_outer_state: bool = False,
        pseudo_gradient: Literal["scaled", "raw"] = "scaled",
        outer_optimizer: Literal["sgd", "nesterov", "adam"] = "sgd",
        clip_norm: float | None = None,
        compression: Literal["none", "fp16", "bf16", "int8", "fp8", "fp4"] = "none",
        error_feedback: bool = False,
        adam_beta2: float | None = None,
        adam_eps: float | None = None,
        eager: bool = False,
        fragments: int = 1,
        sync_delay: int = 0,
        fragment_mix: float = 1.0,
    ) -> None:
        check_settings(
            tau=tau,
            alpha=alpha,
            beta=beta,
            nesterov=nesterov,
            base_buffers=base_buffers,
            pseudo_gradient=pseudo_gradient,
            outer_optimizer=outer_optimizer,
            clip_norm=clip_norm,
            compression=compression,
            error_feedback=error_feedback,
            shard_outer_state=shard_outer_state,
            adam_beta2=adam_beta2,
            adam_eps=adam_eps,
            eager=eager,
            fragments=fragments,
            sync_delay=sync_delay,
            fragment_mix=fragment_mix,
        )
        streaming = fragments > 1 or sync_delay > 0 or fragment_mix != 1.0
        if streaming and not isinstance(algorithm, LocalSGD | AllReduce):
            raise ValueError(
                f"streaming fragments need Local SGD or AR-SGD as the base algorithm, not {type(algorithm).__name__} "
                "(push-sum weights belong to a rank's whole model)"
            )
        layers = layers_of(params) if isinstance(params, nn.Module) else None
        self.shard_outer_state = shard_outer_state  # before the flat buffers are made: they are padded for it
        self.compression = compression
        super().__init__(params, base_optimizer, algorithm)
        self.tau, self.alpha, self.beta, self.nesterov = tau, float(alpha), float(beta), bool(nesterov)
        self.base_buffers, self.pseudo_gradient = base_buffers, pseudo_gradient
        self.outer_optimizer, self.clip_norm, self.error_feedback = outer_optimizer, clip_norm, bool(error_feedback)
        self.adam_beta2 = 0.999 if adam_beta2 is None else float(adam_beta2)
        self.adam_eps = 1e-8 if adam_eps is None else float(adam_eps)
        self._codec = None if compression == "none" else Codec(compression)
        self.eager = bool(eager)
        self.fragments, self.sync_delay, self.fragment_mix = fragments, sync_delay, float(fragment_mix)
        self._streaming = None  # the fragments when streaming
        if streaming:
            self._streaming = Fragments(layers or list(range(len(self._params))), fragments, tau, sync_delay)
        self._closed_form = (
            outer_optimizer == "sgd" and clip_norm is None and self._codec is None and not eager and not streaming
        )
        self._shard = Shard(self.comm, self.flat.numel, shard_outer_state)
        self._x0 = self._v = torch.empty(0)  # x_{t,0} and v_t = gamma_{t-1} u_t (this rank's slice when sharded)
        self._residual = torch.empty(0)  # e_i, error feedback's residual (the padded flat length)
        self._torch_outer: torch.optim.Optimizer | None = None  # outer_optimizer = nesterov | adam, over x_{t,0}
        self._sent = self._own = torch.empty(0)  # eager: sum_j Delta_j^{t-1} (all-reduced in flight), Delta_i^{t-1}
        self._in_flight: Work | None = None  # eager: the all-reduce of the last outer step
        self._gammas: list[float] | None = None  # gamma_{t-1} of each parameter
        self._outer = 0

    @property
    def outer_step(self) -> int:
        """Number of outer iterations completed (t)."""
        return self._outer

    def _flat_multiple(self) -> int:
        return self.comm.world_size if self.shard_outer_state or self.compression != "none" else 1

    def _start(self) -> None:
        super()._start()  # every rank now holds rank 0's parameters: x_{0,0}
        self._x0 = self._shard.mine(self.flat.data).clone()
        self._v = torch.zeros_like(self._x0)
        if self.error_feedback:
            self._residual = torch.zeros_like(self.flat.data)
        if self.eager:
            self._sent, self._own = torch.zeros_like(self._x0), torch.zeros_like(self._x0)

    def _ends_outer_iteration(self) -> bool:
        return (self._step + 1) % self.tau == 0

    def _after_inner_step(self, outer: bool) -> None:
        if self._streaming is not None:
            self._stream(self._step - 1)
        elif outer:
            self._outer_step()

    def _scaled_gammas(self) -> list[float]:
        """Each parameter's gamma_t; SlowMo's scaled pseudo-gradient divides by it, so it must be > 0."""
        gammas = self.learning_rates()
        if self.pseudo_gradient == "scaled" and min(gammas) <= 0:
            raise ValueError(
                f"SlowMo divides by the base lr at the outer step, but it is {min(gammas)} at inner step "
                f"{self._step}; keep the lr schedule above 0 (e.g. start warm-up above 0)"
            )
        return gammas

    @torch.no_grad()
    def _outer_step(self) -> None:
        """Steps 2-5 in place, where the model holds x_{t,tau}: Algorithm 1's closed form in 3 passes (alpha = 1) or
        4-5; with compression, clipping or a torch outer optimizer, the mean pseudo-gradient first, then its step."""
        self.algorithm.flush()
        gammas = self._scaled_gammas()
        previous = self._gammas or gammas  # (at t = 0, v = 0: nothing to rescale)
        if self._closed_form:
            x = self._algorithm_1(gammas, previous)
        else:
            x = self._eager_pseudo_gradient() if self.eager else self._mean_pseudo_gradient()  # where the model is
            self._clip(x)
            if self.outer_optimizer == "sgd":
                self._momentum_step(x, gammas, previous)
            else:
                self._torch_step(x, gammas)
        self._x0.copy_(x)
        self._gammas = gammas
        self._shard.gather_(self.flat.data)
        average_(self.comm, self._buffers)
        self.algorithm.reset_weights()
        self._base_state_(self.base_buffers)  # step 5: keep, reset or average the base optimizer's buffers
        self._outer += 1

    def _algorithm_1(self, gammas: list[float], previous: list[float]) -> torch.Tensor:
        """The exact average, then steps 3-4 in closed form; returns the slice holding x_{t+1,0}."""
        equal = self.algorithm.replicas_equal  # every rank holds x_{t,tau} already (AllReduce): no exact average
        x_tau = self._shard.mine(self.flat.data) if equal else self._shard.mean_(self.flat.data)
        if not (self.alpha == 1.0 and not self.nesterov):
            torch.sub(self._x0, x_tau, out=x_tau)  # Delta
            self._momentum_step(x_tau, gammas, previous)
            return x_tau
        for a, b, m in self._momenta(gammas, previous):
            x0, v, x = self._x0[a:b], self._v[a:b], x_tau[a:b]
            x.add_(v, alpha=-m)  # x_{t+1,0} = x_{t,tau} - m v_t
            x0.sub_(x)  # v_{t+1} = x_{t,0} - x_{t+1,0}, where x_{t,0} was: the two buffers swap roles
        self._x0, self._v = self._v, self._x0
        return x_tau

    def _momenta(self, gammas: list[float], previous: list[float]) -> list[tuple[int, int, float]]:
        """(start, end, m) over this rank's slice: m = beta gamma_t / gamma_{t-1} (v_t in the units of gamma_t), or
        beta for the raw pseudo-gradient."""
        scaled = self.pseudo_gradient == "scaled"
        runs = self._shard.runs(self.flat.runs(list(zip(gammas, previous, strict=True))))
        return [(a, b, self.beta * (gamma / last if scaled else 1.0)) for a, b, (gamma, last) in runs]

    def _momentum_step(self, x: torch.Tensor, gammas: list[float], previous: list[float]) -> None:
        """``x`` holds Delta; it receives x_{t+1,0}: v_{t+1} = m v_t + Delta, x_{t+1,0} = x_{t,0} - alpha v_{t+1}
        (Nesterov: x_{t,0} - alpha (beta v_{t+1} + Delta))."""
        for a, b, m in self._momenta(gammas, previous):
            self._momentum_range(a, b, x[a:b], m)

    def _momentum_range(self, a: int, b: int, delta: torch.Tensor, m: float) -> None:
        """On [a, b): ``delta`` holds Delta and receives x_{t+1,0}; v_{t+1} = m v_t + Delta."""
        x0, v = self._x0[a:b], self._v[a:b]
        torch.add(delta, v, alpha=m, out=v)  # v_{t+1} = m v_t + Delta
        if self.nesterov:  # x_{t+1,0} = x_{t,0} - alpha (beta v_{t+1} + Delta)
            torch.add(x0, delta, alpha=-self.alpha, out=delta).add_(v, alpha=-self.alpha * self.beta)
        else:
            torch.add(x0, v, alpha=-self.alpha, out=delta)  # x_{t+1,0} = x_{t,0} - alpha v_{t+1}

    def _mean_pseudo_gradient(self) -> torch.Tensor:
        """Delta_bar = mean_i (x_{t,0} - x^i_{t,tau}) into this rank's slice of the model's buffer, returned: from the
        exact average, or compressed (:func:`~slowmo.compress.compressed_mean_`, with error feedback's residual)."""
        data = self.flat.data
        if self._codec is None or self.algorithm.replicas_equal:  # equal replicas: nothing to average or send
            x = self._shard.mine(data) if self.algorithm.replicas_equal else self._shard.mean_(data)
            return torch.sub(self._x0, x, out=x)
        x = data[: self.flat.numel]
        torch.sub(self._x0, x, out=x)  # p_i = Delta_i (+ e_i); the padding stays 0
        if self.error_feedback:
            data.add_(self._residual)
        compressed_mean_(self.comm, data, self._codec, self._residual if self.error_feedback else None)
        return x

    def _eager_pseudo_gradient(self) -> torch.Tensor:
        """Eager updates (Kale, Douillard & Donchev 2025, arXiv 2502.12996): the all-reduce of Delta_i^t is started
        now and completes during round t + 1; the outer step uses this rank's fresh Delta_i^t in place of its share
        of the missing mean: Delta~_i^t = (Delta_i^t + sum_{j != i} Delta_j^{t-1}) / m (Delta^{-1} = 0), returned in
        the model's buffer. The ranks' x_{t+1,0} then differ by their own terms, and agree again on the true means."""
        x = self.flat.values
        torch.sub(self._x0, x, out=x)  # Delta_i^t
        self._wait_in_flight()  # self._sent: sum_j Delta_j^{t-1}
        self._sent.sub_(self._own)  # the others' sum
        self._own.copy_(x)
        x.add_(self._sent).div_(self.comm.world_size)  # Delta~_i^t
        self._sent.copy_(self._own)
        self._in_flight = self.comm.all_reduce_async(self._sent)
        return x

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.wait()
            self._in_flight = None

    def synchronize(self) -> None:
        self._wait_in_flight()
        if self._streaming is not None:
            self._streaming.complete(self.comm.world_size)
        super().synchronize()

    @torch.no_grad()
    def _stream(self, step: int) -> None:
        """After inner step ``step``: launch the fragments due, then merge those launched d steps before
        (:mod:`slowmo.streaming`)."""
        fragments, gammas = self._streaming, self._scaled_gammas()
        for p in fragments.due(step):
            equal = self.algorithm.replicas_equal
            fragments.launch(p, step, self._x0, self.flat.data, self.flat.ranges, gammas, self.comm, equal)
        for p in fragments.ready(step):
            self._merge(p)
        if (step + 1) % self.tau == 0:
            average_(self.comm, self._buffers)
            self._outer += 1

    def _merge(self, fragment: int) -> None:
        """Fragment p's outer step on its mean pseudo-gradient, mixed into the model (alpha_mix)."""
        flight = self._streaming.in_flight.pop(fragment)
        delta = flight.complete(self.comm.world_size)
        self._clip(delta)
        members = self._streaming.members[fragment]
        ranges = [self.flat.ranges[i] for i in members]
        self._gammas = self._gammas or list(self.learning_rates())
        scaled, offset, pieces = self.pseudo_gradient == "scaled", 0, []
        for a, b in ranges:  # each parameter's piece of the fragment's Delta_bar
            pieces.append(delta[offset : offset + b - a])
            offset += b - a
        if self.outer_optimizer == "sgd":
            for i, (a, b), gamma, piece in zip(members, ranges, flight.gammas, pieces, strict=True):
                self._momentum_range(a, b, piece, self.beta * (gamma / self._gammas[i] if scaled else 1.0))
        else:
            optimizer = self._outer_torch_optimizer(self.flat.ranges)
            for group in optimizer.param_groups:  # only the fragment's parameters step
                group["params"][0].grad = None
            for i, gamma, piece in zip(members, flight.gammas, pieces, strict=True):
                group = optimizer.param_groups[i]
                group["lr"] = self.alpha * gamma if scaled else self.alpha
                group["params"][0].grad = piece / gamma if scaled else piece
            optimizer.step()
            for (a, b), piece in zip(ranges, pieces, strict=True):
                piece.copy_(self._x0[a:b])
        for i, (a, b), gamma, piece in zip(members, ranges, flight.gammas, pieces, strict=True):
            x = self.flat.data[a:b]
            if self.fragment_mix == 1.0:
                x.copy_(piece)
            else:  # x_p <- alpha_mix x~_p + (1 - alpha_mix) x_p
                x.mul_(1.0 - self.fragment_mix).add_(piece, alpha=self.fragment_mix)
            self._x0[a:b].copy_(piece)
            self._gammas[i] = gamma
        self._base_state_(self.base_buffers, [self._params[i] for i in members])

    def _clip(self, delta: torch.Tensor) -> None:
        """Delta_bar <- Delta_bar min(1, clip_norm / (||Delta_bar||_2 + 1e-6)), the norm over all parameters."""
        if self.clip_norm is None:
            return
        square = delta.pow(2).sum().reshape(1)
        if self.shard_outer_state:  # this rank holds one slice: the norm's square is the sum over the ranks
            self.comm.all_reduce(square)
        delta.mul_(torch.clamp(self.clip_norm / (square.sqrt() + 1e-6), max=1.0))

    def _torch_step(self, delta: torch.Tensor, gammas: list[float]) -> None:
        """One step of torch's optimizer over x_{t,0} with the gradient Delta_bar / gamma_t and the lr alpha gamma_t
        (raw: Delta_bar and alpha); ``delta`` then receives x_{t+1,0}."""
        scaled = self.pseudo_gradient == "scaled"
        runs = self._shard.runs(self.flat.runs(gammas))
        optimizer = self._outer_torch_optimizer([(a, b) for a, b, _ in runs])
        for (a, b, gamma), group in zip(runs, optimizer.param_groups, strict=True):
            group["lr"] = self.alpha * gamma if scaled else self.alpha
            group["params"][0].grad = delta[a:b] / gamma if scaled else delta[a:b]
        optimizer.step()
        delta.copy_(self._x0)

    def _outer_torch_optimizer(self, ranges: list[tuple[int, int]]) -> torch.optim.Optimizer:
        """torch's SGD with Nesterov momentum beta, or Adam with betas (beta, adam_beta2), over x_{t,0}: one param
        group per range (per run of equal base lrs; per parameter when streaming), built at the first outer step or
        when a checkpoint is loaded."""
        if self._torch_outer is not None and len(self._torch_outer.param_groups) == len(ranges):
            return self._torch_outer
        if self._torch_outer is not None:
            raise ValueError(
                "the base param groups' lrs became equal or different during training, which changes how "
                f"outer_optimizer={self.outer_optimizer} splits x_{{t,0}}; keep the groups' lrs distinct or equal"
            )
        params = [{"params": [self._x0[a:b]]} for a, b in ranges]
        if self.outer_optimizer == "nesterov":
            self._torch_outer = torch.optim.SGD(params, lr=self.alpha, momentum=self.beta, nesterov=True)
        else:
            betas = (self.beta, self.adam_beta2)
            self._torch_outer = torch.optim.Adam(params, lr=self.alpha, betas=betas, eps=self.adam_eps)
        return self._torch_outer

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        self._wait_in_flight()  # (an eager all-reduce in flight is saved completed: its result is the same)
        state = super().state_dict()
        outer = {"t": self._outer, "gammas": self._gammas, "shard": self._shard.key, "numel": self._shard.numel}
        buffers = {"x0": self._x0, "v": self._v, "residual": self._residual, "sent": self._sent, "own": self._own}
        state["outer"] = outer | {key: value.clone() for key, value in buffers.items()}
        state["outer"]["optimizer"] = None if self._torch_outer is None else self._torch_outer.state_dict()
        if self._streaming is not None:
            state["outer"]["fragments"] = self._streaming.state_dict(self.comm.world_size)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        outer = state_dict["outer"]
        if outer["numel"] != self._shard.numel or outer["shard"] != self._shard.key:
            raise ValueError(
                f"the checkpoint's SlowMo state is for {outer['numel']} parameters sharded as "
                f"{outer['shard']}, this run has {self._shard.numel} sharded as {self._shard.key}; "
                "resume with the same model, world size and shard_outer_state"
            )
        like = self.flat.data
        self._outer, self._gammas = outer["t"], outer["gammas"]
        self._x0, self._v, self._residual, self._sent, self._own = (
            outer[k].to(dtype=like.dtype, device=like.device).clone() for k in ("x0", "v", "residual", "sent", "own")
        )
        self._in_flight = None
        self._torch_outer = None  # over the loaded x_{t,0}
        if outer["optimizer"] is not None:
            if self._streaming is not None:
                ranges = self.flat.ranges
            else:
                ranges = [(a, b) for a, b, _ in self._shard.runs(self.flat.runs(self.learning_rates()))]
            self._outer_torch_optimizer(ranges).load_state_dict(outer["optimizer"])
        if self._streaming is not None:
            self._streaming.load_state_dict(outer["fragments"], like)

    def __repr__(self) -> str:
        knobs = f"tau={self.tau}, alpha={self.alpha}, beta={self.beta}, nesterov={self.nesterov}"
        return f"SlowMo({type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__}, {knobs})"
