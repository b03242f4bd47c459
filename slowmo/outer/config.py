"""The harness's ``slowmo`` section (``configs/slowmo/<preset>.yaml`` and the groups ``slowmo/update``,
``slowmo/mean``) and the SlowMo it builds.

    slowmo=off|on|bmuf|lookahead|diloco            the preset (on: Algorithm 1 with every knob free)
    slowmo.tau, alpha, beta, nesterov, pseudo_gradient   its knobs (null: the preset's default)
    slowmo/update=slow_momentum|torch|nesterov|adam      the outer update (nesterov, adam: torch's, preset)
    slowmo/mean=exact|compressed|eager                   the mean; slowmo.shard_outer_state=true shards it
    slowmo.fragments.count|delay|mix                     streaming fragments
    slowmo.clip_norm, slowmo.base_buffers

Each part's section is checked against its own dataclass (``slowmo.mean.codec`` against the compressed mean's), as
the algorithms' are; a key replaced by a part's is refused in one line that names its new spelling.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from ..registry import ConfigError
from .algorithm1 import check
from .clip import ClipNorm
from .fragments import Fragments, FragmentsConfig
from .parts import MEANS, UPDATES, Parts
from .presets import PRESETS
from .slowmo import BASE_BUFFERS

KNOBS = ("alpha", "beta", "nesterov", "pseudo_gradient")


@dataclass
class OuterConfig:
    """The ``slowmo`` section; a null knob takes the preset's default."""

    enabled: bool  # false: the base algorithm alone (slowmo=off)
    preset: str  # a registered preset (slowmo/outer/presets.py)
    tau: int | None  # inner steps per outer step (null: the preset's)
    alpha: float | None  # the slow learning rate (the paper: 1)
    beta: float | None  # the slow momentum, in [0, 1) (the paper tunes it per cell, 0.4-0.8)
    nesterov: bool | None  # the outer step in Nesterov's form (DiLoCo's)
    pseudo_gradient: str | None  # scaled (SlowMo's) | raw (BMUF's and DiLoCo's)
    base_buffers: str  # keep | reset | average
    shard_outer_state: bool  # the mean's outer state sharded: 1/m of x_{t,0} and u per rank
    clip_norm: float | None  # max L2 norm of the mean pseudo-gradient (parameter units); null: no clipping
    fragments: FragmentsConfig
    update: Any = None  # slowmo/update=<name>: checked against that update's dataclass (slowmo.train.config)
    mean: Any = None  # slowmo/mean=<name>: checked against that mean's dataclass

    RENAMED: ClassVar[dict[str, str]] = {  # keys of the options beyond Algorithm 1 before they became parts
        "outer_optimizer": "is now the update: slowmo/update=nesterov, adam or torch (slowmo.update.optimizer, "
        "slowmo.update.options)",
        "adam_beta2": "is now slowmo.update.options.betas=[beta1,beta2] (slowmo/update=adam)",
        "adam_eps": "is now slowmo.update.options.eps (slowmo/update=adam)",
        "compression": "is now the mean: slowmo/mean=compressed slowmo.mean.codec=<codec>",
        "error_feedback": "is now slowmo.mean.error_feedback (slowmo/mean=compressed, or eager with a codec)",
        "eager": "is now the mean: slowmo/mean=eager",
        "fragments": "is now a section: slowmo.fragments.count=<P> (and .delay, .mix)",
        "sync_delay": "is now slowmo.fragments.delay",
        "fragment_mix": "is now slowmo.fragments.mix",
    }

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"slowmo.preset={self.preset!r} is not one of {', '.join(PRESETS.names())}")
        if self.base_buffers not in BASE_BUFFERS:
            raise ConfigError(f"base_buffers must be 'keep', 'reset' or 'average', got {self.base_buffers!r}")
        knobs = {k: getattr(self, k) for k in ("tau", *KNOBS) if getattr(self, k) is not None}
        try:
            check(**knobs)
            if self.clip_norm is not None:
                ClipNorm(self.clip_norm)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def check_parts(self) -> None:
        """Once the update and mean sections are typed: the parts they make, and whether they combine."""
        self.build(world_size=2)

    def _preset_knobs(self) -> dict[str, Any]:
        """The preset's arguments from the knobs set here; a knob the preset fixes is refused (one line)."""
        entry = PRESETS[self.preset]
        names = entry.extra["knobs"]
        given = {knob: getattr(self, knob) for knob in KNOBS if getattr(self, knob) is not None}
        for knob in given:
            if knob not in names:
                raise ConfigError(
                    f"slowmo.{knob} is fixed by the {self.preset} preset; leave it unset (null) or "
                    "choose slowmo=on for Algorithm 1 with every knob free"
                )
        if not UPDATES[self.update.name].extra.get("built_by_presets") and entry.extra.get("fixes_update", True):
            raise ConfigError(
                f"slowmo.update is fixed by the {self.preset} preset; leave it unset or choose slowmo=on for "
                "Algorithm 1 with every knob free"
            )
        return {names[knob]: value for knob, value in given.items()}

    def build(self, world_size: int) -> dict[str, Any]:
        """SlowMo's arguments after the base optimizer and algorithm, for ``world_size`` ranks: tau, the parts and the
        base-buffer policy; refused in one line where a part refuses its settings or the others."""
        entry = PRESETS[self.preset]
        tau = self.tau if self.tau is not None else entry.extra["tau"]
        if tau is None:
            raise ConfigError(f"the {self.preset} preset needs slowmo.tau (its inner steps per outer step)")
        try:
            update = self._update(entry, world_size)
            mean = MEANS[self.mean.name].build.from_config(self.mean)
            mean.shard = self.shard_outer_state
            fragments = Fragments(self.fragments.count, self.fragments.delay, self.fragments.mix)
            clip = ClipNorm(self.clip_norm) if self.clip_norm is not None else None
            Parts(tau, update, mean, fragments, clip).check()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return {
            "tau": tau,
            "update": update,
            "mean": mean,
            "fragments": fragments,
            "clip": clip,
            "base_buffers": self.base_buffers,
        }

    def _update(self, entry, world_size: int):
        kwargs = self._preset_knobs()
        if UPDATES[self.update.name].extra.get("built_by_presets"):
            if "world_size" in inspect.signature(entry.build).parameters:
                kwargs["world_size"] = world_size
            return entry.build(**kwargs)
        for knob in ("beta", "nesterov"):
            if getattr(self, knob) is not None:
                raise ConfigError(
                    f"slowmo.{knob} is slow momentum's (Algorithm 1's); the outer {self.update.optimizer} takes its "
                    f"own in slowmo.update.options: leave slowmo.{knob} unset (null)"
                )
        defaults = dict(alpha=1.0, pseudo_gradient="scaled")
        given = {k: getattr(self, k) for k in defaults if getattr(self, k) is not None}
        return UPDATES[self.update.name].build.from_config(self.update, **(defaults | given))
