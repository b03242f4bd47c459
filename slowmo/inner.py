"""The inner loop: a base optimizer driven by a base algorithm, as one ``torch.optim.Optimizer``.

``DistributedOptimizer`` is what runs when SlowMo is off (AR-SGD, plain Local SGD, SGP, OSGP); :class:`SlowMo`
adds the outer step on top. Both hook into the optimizer, so a user's training loop is unchanged:
``loss.backward(); opt.step(); opt.zero_grad()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .algorithms.base import Algorithm
from .flat import FlatParameters, average_, flatten, unflatten_
from .replicas import ShardedParameters, is_sharded, local


def _parameters(params: Iterable[torch.Tensor] | Iterable[dict]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out


class DistributedOptimizer(torch.optim.Optimizer):
    """One call to :meth:`step` is one inner step: the algorithm's pre-step communication (e.g. the gradient
    mean), the base optimizer's step, then the algorithm's post-step communication (e.g. gossip).

    Args:
        params: the model (an ``nn.Module``, whose floating-point buffers such as BatchNorm statistics are then
            averaged with the parameters) or its parameters, in the same order on every rank.
        base_optimizer: any ``torch.optim.Optimizer`` over exactly these parameters. Its param groups are shared
            with this optimizer, so an lr scheduler may be attached to either.
        algorithm: the base algorithm (:class:`~slowmo.AllReduce`, :class:`~slowmo.LocalSGD`, ...).

    On the first step, rank 0's parameters and buffers are broadcast so that every rank starts from the same
    x_{0,0} (as DDP does).
    """

    FORMAT = "slowmo/1"  # of state_dict()

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
    ) -> None:
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            buffers = [b for b in module.buffers() if b.is_floating_point()]
            params = list(module.parameters())
        else:
            buffers, params = [], _parameters(params)
        _check_parameters(params, base_optimizer)
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)  # shares the group dicts
        self.base_optimizer = base_optimizer
        self.algorithm = algorithm
        self.comm = algorithm.comm
        self.flat = self._flat(module, params)  # the parameters become views of flat.data
        self._params, self._buffers = params, buffers
        algorithm.bind(self.flat, buffers)
        self._step = 0
        self._started = False

    @property
    def inner_step(self) -> int:
        """Number of inner steps taken so far."""
        return self._step

    def _flat_multiple(self) -> int:
        """The flat buffers are padded to a multiple of this (SlowMo's sharded state: the ranks)."""
        return 1

    def _flat(self, module: nn.Module | None, params: list[torch.Tensor]) -> FlatParameters:
        """The parameters' flat storage: theirs, or, for a model sharded by FSDP2 (sharded replicas), its local
        shards'."""
        if not is_sharded(params):
            return FlatParameters(params, self._flat_multiple())
        if module is None:
            raise ValueError("a model sharded by FSDP2: pass the model itself, not its parameters")
        if self._flat_multiple() != 1:
            raise ValueError("sharded replicas already shard the outer state (1/k per rank): use slowmo/mean=exact")
        return ShardedParameters(module, params, self.comm)

    # ----------------------------------------------------------------------------------- stepping
    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        """Zero the flat gradient buffer (the gradients are views of it, so they are never set to None)."""
        self.flat.zero_grad()

    def wait_gradients(self) -> None:
        """Complete the gradient communication that the backward pass started (e.g. before unscaling fp16
        gradients); :meth:`step` does it anyway."""
        self.algorithm.wait_gradients()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale this rank's gradient g by min(1, max_norm / ||g||_2) before the step (the gradient the base
        optimizer will use: the mean over ranks for AllReduce, the local one for Local SGD and SGP); returns ||g||_2
        before clipping. As ``torch.nn.utils.clip_grad_norm_``, the factor is max_norm / (||g||_2 + 1e-6), at most 1."""
        self.wait_gradients()
        return self.flat.clip_grad_norm_(max_norm)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.flat.owns(0):
            raise RuntimeError(
                "this optimizer's parameters no longer live in its flat buffer: a newer slowmo optimizer was built "
                "over the same model (step that one), or the model was moved after this one was built (build it after)"
            )
        if not self._started:
            self._start()
        self.flat.attach_grads()
        self.flat.count_inner_step()
        self.algorithm.before_step(self._step)
        self.base_optimizer.step()
        outer = self._ends_outer_iteration()
        self.algorithm.after_step(self._step, outer)
        self._step += 1
        self._after_inner_step(outer)
        return loss

    def _start(self) -> None:
        self.comm.broadcast(self.flat.values, src=0)
        if self._buffers:
            buffers = flatten(self._buffers)
            self.comm.broadcast(buffers, src=0)
            unflatten_(buffers, self._buffers)
        self._started = True

    def _ends_outer_iteration(self) -> bool:
        return False

    def _after_inner_step(self, outer: bool) -> None:
        """After every inner step (``outer``: it ends an outer iteration): nothing here; SlowMo's outer step."""

    def learning_rates(self) -> list[float]:
        """Each parameter's lr now (its base param group's): gamma_t of Algorithm 1, per parameter."""
        lr_of = {id(p): float(group["lr"]) for group in self.base_optimizer.param_groups for p in group["params"]}
        return [lr_of[id(p)] for p in self._params]

    def _base_state_(self, policy: str, params: list[torch.Tensor] | None = None) -> None:
        """The base optimizer's state of ``params`` (default: all): "keep" it, "reset" it to zero (as a freshly built
        optimizer: momentum, moments and step counts) or "average" its per-parameter buffers over the ranks
        (momentum, moments; step counts are equal on all ranks anyway)."""
        if policy == "keep":
            return
        state = self.base_optimizer.state
        entries = [
            (p, value)
            for p in (self._params if params is None else params)
            for _, value in sorted(state.get(p, {}).items())
            if torch.is_tensor(value) and value.is_floating_point()
        ]
        if policy == "reset":
            for _, value in entries:
                value.zero_()
        else:
            average_(self.comm, [local(value) for p, value in entries if value.shape == p.shape])

    # ----------------------------------------------------------------------------------- the averaged model
    @torch.no_grad()
    def averaged_parameters(self) -> list[torch.Tensor]:
        """Copies of the parameters and floating-point buffers averaged over all ranks (model order), whole, leaving
        the training state untouched: the model to evaluate."""
        tensors = [local(t).detach().clone() for t in self._params + self._buffers]
        average_(self.comm, tensors)
        n = len(self._params)
        return self.flat.whole(tensors[:n]) + self.flat.averaged_inside(tensors[n:])

    @torch.no_grad()
    def whole_parameters(self) -> list[torch.Tensor] | None:
        """This rank's parameters and floating-point buffers, whole, where the model holds only a shard of them
        (sharded replicas); None where it holds them whole."""
        if not self.flat.whole_over:
            return None
        return self.flat.whole([local(p).detach() for p in self._params]) + [b.detach().clone() for b in self._buffers]

    @torch.no_grad()
    def synchronize(self) -> None:
        """Exact average in place: complete in-flight gossip, average parameters and buffers, reset push-sum
        weights (e.g. at the end of training, before saving the final model)."""
        self.algorithm.flush()
        self.comm.all_reduce(self.flat.values, "mean")
        average_(self.comm, self._buffers)
        self.flat.averaged_inside(self._buffers)
        self.algorithm.reset_weights()

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to resume bit-exactly: base optimizer, algorithm state (push-sum weight, in-flight
        messages), inner step counter (which also fixes the gossip graph's step)."""
        return {
            "format": self.FORMAT,
            "optimizer": type(self).__name__,
            "algorithm": type(self.algorithm).__name__,
            "step": self._step,
            "started": self._started,
            "base": self.base_optimizer.state_dict(),
            "algorithm_state": self.algorithm.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        found = state_dict.get("format") if isinstance(state_dict, dict) else None
        if not isinstance(found, str) or not found.startswith("slowmo/"):
            raise ValueError(
                f"not a slowmo optimizer state (expected format {self.FORMAT!r}); "
                "load a state saved by slowmo's state_dict() of this version"
            )
        for key, mine in (("optimizer", type(self).__name__), ("algorithm", type(self.algorithm).__name__)):
            if state_dict[key] != mine:
                raise ValueError(
                    f"the checkpoint was saved by {key} {state_dict[key]} but this run uses {mine}; "
                    "resume with the same configuration or start a new run directory"
                )
        if found != self.FORMAT:
            raise ValueError(
                f"a {state_dict.get('optimizer')} state of format {found}, and this {type(self).__name__} reads "
                f"{self.FORMAT} (slowmo/2: the outer step as parts); resume it with the slowmo that wrote it, or "
                "start a new run directory"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # loading made new group dicts: share them again
        self.algorithm.load_state_dict(state_dict["algorithm_state"])
        self._step = state_dict["step"]
        self._started = state_dict["started"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__})"


def _check_parameters(params: list[torch.Tensor], base_optimizer: torch.optim.Optimizer) -> None:
    if not params:
        raise ValueError("the model has no parameters to optimize")
    for index, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(
                f"parameter {index} (shape {tuple(p.shape)}) has dtype {p.dtype}; only floating-point "
                "parameters can be averaged and updated: register it as a buffer or make it float"
            )
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"parameters mix dtypes {sorted(map(str, dtypes))} or devices {sorted(map(str, devices))}; "
            "keep the model in one dtype on one device (use autocast for mixed precision)"
        )
    mine = {id(p) for p in params}
    theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
    if mine != theirs:
        raise ValueError(
            f"the base optimizer's parameters are not the model's ({len(mine - theirs)} of the model's "
            f"missing from it, {len(theirs - mine)} of its own not in the model); build it over "
            "model.parameters()"
        )
