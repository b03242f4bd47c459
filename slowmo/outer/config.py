"""The harness's ``slowmo`` section and the outer step it builds. Each part owns its knobs, in its own section:

    slowmo=off|on|bmuf|lookahead|diloco        a preset: YAML defaults for the parts (configs/slowmo/<preset>.yaml)
    slowmo.tau, base_buffers, clip_norm,         the outer step's own keys (slowmo.label names it in tables)
    slowmo.state_device
    slowmo/update=slow_momentum|torch|nesterov|adam|bmuf|lookahead|diloco
    slowmo.update.alpha, beta, nesterov, ...     the update's knobs (configs/slowmo/update/<name>.yaml)
    slowmo/mean=exact|sharded|compressed|eager   slowmo.mean.codec, ...: the mean's (sharded: 1/m of the state per rank)
    slowmo.fragments.count|delay|mix             streaming fragments

Each part's section is checked against its own dataclass (``slowmo.update`` against the chosen update's), as the
algorithms' are; a key that moved to a part is refused in one line that names its new spelling.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from omegaconf import OmegaConf

from ..registry import ConfigError, Registry, setting
from .algorithm1 import check
from .clip import ClipNorm
from .fragments import Fragments, FragmentsConfig
from .parts import MEANS, UPDATES, Parts
from .slowmo import BASE_BUFFERS

# a default that depends on the run: 1 - 1/m for m ranks (BMUF's block momentum, configs/slowmo/update/bmuf.yaml)
OmegaConf.register_new_resolver("one_minus_reciprocal", lambda m: 1.0 - 1.0 / int(m), replace=True)


@dataclass
class OuterConfig:
    """The ``slowmo`` section: the outer step's own keys; its update's and its mean's are theirs."""

    enabled: bool  # false: the base algorithm alone (slowmo=off)
    label: str  # what tables and figures call this outer step (SlowMo, BMUF, Lookahead, DiLoCo)
    tau: int = setting(minimum=1)  # inner steps per outer step
    base_buffers: str  # keep | reset | average
    clip_norm: float | None  # max L2 norm of the mean pseudo-gradient (parameter units); null: no clipping
    state_device: str | None  # null: the outer state with the model; cpu: in host memory (prime's offload)
    fragments: FragmentsConfig
    update: Any = None  # slowmo/update=<name>: checked against that update's dataclass (slowmo.train.config)
    mean: Any = None  # slowmo/mean=<name>: checked against that mean's dataclass

    RENAMED: ClassVar[dict[str, str]] = {  # keys that moved into a part's section, or became a part
        **{
            knob: f"is the update's own knob now: slowmo.update.{knob}"
            for knob in ("alpha", "beta", "nesterov", "pseudo_gradient")
        },
        "preset": "is gone: slowmo=<preset> (on, bmuf, lookahead, diloco) sets the parts' defaults, slowmo.label "
        "names it",
        "outer_optimizer": "is now the update: slowmo/update=nesterov, adam or torch (slowmo.update.optimizer, "
        "slowmo.update.options)",
        "adam_beta2": "is now slowmo.update.options.betas=[beta1,beta2] (slowmo/update=adam)",
        "adam_eps": "is now slowmo.update.options.eps (slowmo/update=adam)",
        "compression": "is now the mean: slowmo/mean=compressed slowmo.mean.codec=<codec>",
        "error_feedback": "is now slowmo.mean.error_feedback (slowmo/mean=compressed, or eager with a codec)",
        "eager": "is now the mean: slowmo/mean=eager",
        "fragments": "is now a section: slowmo.fragments.count=<P> (and .delay, .mix)",
        "sync_delay": "is now slowmo.fragments.delay",
        "shard_outer_state": "is now the mean: slowmo/mean=sharded (the exact mean, 1/m of the outer state per rank)",
        "fragment_mix": "is now slowmo.fragments.mix",
    }

    def check(self) -> None:
        if self.base_buffers not in BASE_BUFFERS:
            raise ConfigError(f"base_buffers must be 'keep', 'reset' or 'average', got {self.base_buffers!r}")
        if self.state_device not in (None, "cpu"):
            raise ConfigError(
                f"slowmo.state_device must be null (the outer state with the model) or cpu (in host memory), got "
                f"{self.state_device!r}"
            )
        try:
            check(tau=self.tau)
            if self.clip_norm is not None:
                ClipNorm(self.clip_norm)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def check_parts(self, elastic: str | None = None, sharded: str | None = None) -> None:
        """Once the update and mean sections are typed: the parts they name, built once per run, and refused in one
        line where a part refuses its settings or the others (:meth:`Parts.check`; ``elastic``: the preamble of an
        elastic run's refusals, whose parts must also run on a changing quorum; ``sharded``: of sharded replicas',
        whose parts run on a shard of the model). :meth:`arguments` hands each rank its copy of them."""
        try:
            update = part(UPDATES, self.update)
            mean = part(MEANS, self.mean)
            fragments = Fragments(self.fragments.count, self.fragments.delay, self.fragments.mix)
            clip = ClipNorm(self.clip_norm) if self.clip_norm is not None else None
            parts = Parts(self.tau, update, mean, fragments, clip, elastic, sharded)
            parts.check()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._parts = parts

    def arguments(self) -> dict[str, Any]:
        """SlowMo's arguments after the base optimizer and algorithm: tau, this rank's copy of the parts that
        :meth:`check_parts` built (each rank's parts keep their own state), the base-buffer policy and where the outer
        state lives."""
        parts: Parts = copy.deepcopy(self._parts)
        return {
            "tau": parts.tau,
            "update": parts.update,
            "mean": parts.mean,
            "fragments": parts.fragments,
            "clip": parts.clip,
            "base_buffers": self.base_buffers,
            "state_device": self.state_device,
        }


def part(registry: Registry, cfg: Any) -> Any:
    """The part a section names (``cfg.name``), built with the section's other fields as its arguments."""
    return registry[cfg.name].build(**{key: value for key, value in asdict(cfg).items() if key != "name"})
