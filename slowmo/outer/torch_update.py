"""Any ``torch.optim`` optimizer as the outer update, stepping x_{t,0} along the mean pseudo-gradient: with
G = Delta_bar / gamma_t and the lr alpha gamma_t (``pseudo_gradient="raw"``: G = Delta_bar and the lr alpha), one step
of the optimizer from x_{t,0} with the gradient G gives x_{t+1,0}. torch's SGD with Nesterov momentum is DiLoCo's outer
step (Douillard et al. 2023, arXiv 2311.08105), Adam the outer Adam of later DiLoCo-family work; any optimizer class
torch has (``"RAdam"``, ``"Adagrad"``, ...) or one of your own (``"my_package.MyOptimizer"``, or the class itself)
works, with its keyword arguments in ``options``.

The optimizer holds one param group per run of x_{t,0} in one base param group (per parameter for fragments),
created at the first outer step of that run: each group's lr is set to alpha gamma_t at every step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from .algorithm1 import check
from .parts import UPDATES, Piece, Update, merge


@dataclass
class TorchUpdateConfig:
    """``slowmo/update=torch`` (or its presets ``nesterov`` and ``adam``)."""

    name: str
    optimizer: str  # a torch.optim class (SGD, Adam, ...) or a dotted path to one of your own
    options: dict[str, Any] = field(default_factory=dict)  # its keyword arguments, lr excepted
    alpha: float = 1.0  # the outer lr, times gamma_t (scaled) or absolute (raw)
    pseudo_gradient: str = "scaled"  # scaled: Delta_bar / gamma_t | raw: Delta_bar

    RENAMED: ClassVar[dict[str, str]] = {  # slow momentum's knobs, which a torch optimizer takes in its options
        knob: f"is slow momentum's knob: the outer torch optimizer takes its own in slowmo.update.options (a preset "
        f"that set it for slow momentum: drop it with ~slowmo.update.{knob})"
        for knob in ("beta", "nesterov")
    }

    def check(self) -> None:
        check(alpha=self.alpha, pseudo_gradient=self.pseudo_gradient)


@UPDATES.register("torch", TorchUpdateConfig, label="torch optimizer")
class TorchUpdate(Update):
    """``optimizer`` (a ``torch.optim.Optimizer`` class, or its name) with ``options`` (its keyword arguments, lr
    excepted: a dict, so that an optimizer's own ``alpha``, RMSprop's, stays its own), stepping x_{t,0}."""

    def __init__(
        self,
        optimizer: str | type[torch.optim.Optimizer],
        alpha: float = 1.0,
        pseudo_gradient: Literal["scaled", "raw"] = "scaled",
        options: dict[str, Any] | None = None,
    ) -> None:
        check(alpha=alpha, pseudo_gradient=pseudo_gradient)
        options = dict(options or {})
        self.cls = optimizer_class(optimizer)
        if "lr" in options:
            raise ValueError(
                f"the outer {self.cls.__name__}'s lr is alpha (times gamma_t): leave lr out of its options"
            )
        try:
            self.cls([torch.zeros(1, requires_grad=True)], lr=1.0, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the outer {self.cls.__name__} refuses its options {options}: {error}") from None
        self.alpha, self.pseudo_gradient, self.options = float(alpha), pseudo_gradient, options
        self.x0 = torch.empty(0)
        self._optimizer: torch.optim.Optimizer | None = None
        self._groups: dict[tuple[int, int], int] = {}  # (start, end) of a run of x_{t,0} -> its param group

    def bind(self, x0: torch.Tensor) -> None:
        self.x0 = x0.clone()

    def step(self, pieces: list[Piece]) -> None:
        pieces = merge(pieces, self.pieces_by)
        scaled = self.pseudo_gradient == "scaled"
        optimizer = self._over([(piece.start, piece.end) for piece in pieces])
        for group in optimizer.param_groups:  # only these pieces step
            group["params"][0].grad = None
        for piece in pieces:
            group = optimizer.param_groups[self._groups[piece.start, piece.end]]
            group["lr"] = self.alpha * piece.gamma if scaled else self.alpha
            group["params"][0].grad = piece.delta / piece.gamma if scaled else piece.delta
        optimizer.step()
        for piece in pieces:
            piece.delta.copy_(self.x0[piece.start : piece.end])

    def _over(self, ranges: list[tuple[int, int]]) -> torch.optim.Optimizer:
        """The optimizer, with a param group (a view of x_{t,0}) for each of ``ranges`` it has not met yet."""
        for start, end in ranges:
            if (start, end) in self._groups:
                continue
            if any(a < end and start < b for a, b in self._groups):
                raise ValueError(
                    "the base param groups' lrs became equal or different during training, which changes how the "
                    f"outer {self.cls.__name__} splits x_{{t,0}}; keep the groups' lrs distinct or equal"
                )
            group = {"params": [self.x0[start:end]]}
            if self._optimizer is None:
                self._optimizer = self.cls([group], lr=self.alpha, **self.options)
            else:
                self._optimizer.add_param_group(group)
            self._groups[start, end] = len(self._groups)
        return self._optimizer

    def state_dict(self) -> dict[str, Any]:
        return {
            "x0": self.x0.clone(),
            "groups": list(self._groups),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        self.x0 = state["x0"].to(dtype=like.dtype, device=like.device).clone()
        self._optimizer, self._groups = None, {}
        if state["optimizer"] is not None:  # the groups over the loaded x_{t,0}, in their first order, then the state
            self._over([tuple(key) for key in state["groups"]]).load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return f"TorchUpdate({self.cls.__name__}, alpha={self.alpha}, pseudo_gradient={self.pseudo_gradient!r})"


def optimizer_class(name: str | type) -> type[torch.optim.Optimizer]:
    """``"Adam"`` (torch.optim's), ``"package.module.Class"``, or the class itself; one line if there is none."""
    if isinstance(name, type):
        found: Any = name
    elif "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attribute, None)
        except ImportError as error:
            raise ValueError(f"outer optimizer {name!r}: cannot import {module} ({error})") from None
    else:
        found = getattr(torch.optim, name, None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise ValueError(
            f"outer optimizer {name!r} is not a torch.optim.Optimizer class; give one of torch.optim's (SGD, Adam, "
            "AdamW, RAdam, ...) or a dotted path to your own"
        )
    return found
