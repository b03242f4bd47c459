"""Outer-step presets: methods that are SlowMo (Algorithm 1, :mod:`slowmo.outer`) with some settings fixed. Each is
defined once, here, with its paper's parameter names and defaults: as a constructor of :class:`~slowmo.SlowMo`
(``SlowMo.bmuf(...)``) and as the harness's choice ``slowmo=<name>``, whose ``configs/slowmo/<name>.yaml`` names
the preset and leaves the knobs it does not set to the defaults below. ``slowmo=on`` is Algorithm 1 itself.

``knobs`` (in each registration) maps the harness's ``slowmo.*`` keys onto the preset's arguments; a key that a
preset fixes (e.g. ``slowmo.pseudo_gradient`` under DiLoCo) is refused with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .algorithms import Algorithm, LocalSGD
from .comm import Single
from .compress import CODECS
from .registry import ConfigError, Registry

OUTER = Registry("outer preset", "slowmo.presets")
BASE_BUFFERS = ("keep", "reset", "average")
PSEUDO_GRADIENTS = ("scaled", "raw")
OUTER_OPTIMIZERS = ("sgd", "nesterov", "adam")


def check_settings(**settings: Any) -> None:
    """Raise ValueError (one line) for a setting of Algorithm 1 out of its range; absent settings are not checked."""
    tau, alpha, beta = settings.get("tau", 1), settings.get("alpha", 1.0), settings.get("beta", 0.0)
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (inner steps per outer step), got {tau!r}")
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0 (slow learning rate; the paper uses 1.0), got {alpha!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1) (slow momentum; the paper tunes it in 0.4-0.8), got {beta!r}")
    if settings.get("base_buffers", "keep") not in BASE_BUFFERS:
        raise ValueError(f"base_buffers must be 'keep', 'reset' or 'average', got {settings['base_buffers']!r}")
    if settings.get("pseudo_gradient", "scaled") not in PSEUDO_GRADIENTS:
        raise ValueError(
            f"pseudo_gradient must be 'scaled' (SlowMo) or 'raw' (BMUF/DiLoCo), got {settings['pseudo_gradient']!r}"
        )
    _check_beyond(settings, beta)


def _check_beyond(settings: dict[str, Any], beta: float) -> None:
    """The settings beyond Algorithm 1: the outer optimizer, clipping, compression and error feedback."""
    outer = settings.get("outer_optimizer", "sgd")
    if outer not in OUTER_OPTIMIZERS:
        raise ValueError(f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {outer!r}")
    if outer != "sgd" and settings.get("nesterov"):
        raise ValueError(
            f"nesterov=True is the Nesterov form of the sgd outer step; with outer_optimizer={outer} leave it false "
            "(outer_optimizer=nesterov is torch's SGD with Nesterov momentum beta)"
        )
    if outer == "nesterov" and beta == 0:
        raise ValueError("outer_optimizer=nesterov needs a momentum beta > 0 (Nesterov momentum 0 is plain sgd)")
    for knob in ("adam_beta2", "adam_eps"):
        value = settings.get(knob)
        if value is not None and outer != "adam":
            raise ValueError(f"{knob} is Adam's; set outer_optimizer=adam or leave {knob} unset (null)")
        if value is not None and not (0 <= value < 1 if knob == "adam_beta2" else value > 0):
            raise ValueError(f"{knob} must be {'in [0, 1)' if knob == 'adam_beta2' else '> 0'}, got {value!r}")
    clip = settings.get("clip_norm")
    if clip is not None and not (isinstance(clip, int | float) and clip > 0):
        raise ValueError(f"clip_norm must be > 0 or None (no clipping of the pseudo-gradient), got {clip!r}")
    compression = settings.get("compression", "none")
    if compression not in CODECS:
        raise ValueError(f"compression must be one of {', '.join(CODECS)}, got {compression!r}")
    if settings.get("error_feedback") and compression == "none":
        raise ValueError(
            "error_feedback needs a compression (int8, fp8, fp4, fp16 or bf16): with none there is no error"
        )
    if settings.get("eager") and (compression != "none" or settings.get("shard_outer_state")):
        raise ValueError(
            "eager=True overlaps one all-reduce of the pseudo-gradient with the next round; it does not combine "
            "with compression or shard_outer_state yet: choose one"
        )
    fragments, delay, mix = (
        settings.get("fragments", 1),
        settings.get("sync_delay", 0),
        settings.get("fragment_mix", 1.0),
    )
    tau = settings.get("tau", 1)
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1 or tau % fragments:
        raise ValueError(f"fragments must be an integer >= 1 that divides tau = {tau}, got {fragments!r}")
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < tau:
        raise ValueError(f"sync_delay must be an integer in [0, tau) = [0, {tau}) inner steps, got {delay!r}")
    if not 0 <= mix <= 1:
        raise ValueError(
            f"fragment_mix must be in [0, 1] (1: the outer-updated fragment replaces the local one), got {mix!r}"
        )
    streaming = fragments > 1 or delay > 0 or mix != 1.0
    if streaming and (compression != "none" or settings.get("eager") or settings.get("shard_outer_state")):
        raise ValueError(
            "streaming fragments (fragments, sync_delay, fragment_mix) do not combine with compression, eager or "
            "shard_outer_state yet: choose one"
        )
    if compression != "none" and settings.get("shard_outer_state"):
        raise ValueError(
            "compression with shard_outer_state is not supported (the sharded outer step gathers parameters, not "
            "the compressed pseudo-gradient); choose one of the two"
        )


KNOBS = ("tau", "alpha", "beta", "nesterov", "pseudo_gradient", "outer_optimizer", "adam_beta2", "adam_eps")
COMMON = (
    "base_buffers",
    "shard_outer_state",
    "clip_norm",
    "compression",
    "error_feedback",
    "eager",
    "fragments",
    "sync_delay",
    "fragment_mix",
)


@dataclass
class OuterConfig:
    """The ``slowmo`` section (``configs/slowmo/<choice>.yaml``): the preset and its knobs; a null knob takes the
    preset's default."""

    enabled: bool  # false: the base algorithm alone (slowmo=off)
    preset: str  # a registered preset
    tau: int | None
    alpha: float | None
    beta: float | None
    nesterov: bool | None
    pseudo_gradient: str | None
    outer_optimizer: str | None  # sgd | nesterov | adam (slowmo=on)
    adam_beta2: float | None
    adam_eps: float | None
    base_buffers: str  # keep | reset | average
    shard_outer_state: bool
    clip_norm: float | None
    compression: str  # none | fp16 | bf16 | int8 | fp8 | fp4
    error_feedback: bool
    eager: bool
    fragments: int
    sync_delay: int
    fragment_mix: float

    def knobs(self) -> dict[str, Any]:
        """The preset's arguments from the knobs set here; a knob the preset fixes is refused (one line)."""
        names = OUTER[self.preset].extra["knobs"]
        given = {knob: getattr(self, knob) for knob in KNOBS if getattr(self, knob) is not None}
        for knob in given:
            if knob not in names:
                raise ConfigError(
                    f"slowmo.{knob} is fixed by the {self.preset} preset; leave it unset (null) or "
                    "choose slowmo=on for Algorithm 1 with every knob free"
                )
        return {names[knob]: value for knob, value in given.items()}

    def common(self) -> dict[str, Any]:
        """The settings every preset takes (``configs/config.yaml``'s ``slowmo`` section), as SlowMo's arguments."""
        return {key: getattr(self, key) for key in COMMON}

    def check(self) -> None:
        if self.preset not in OUTER:
            raise ConfigError(f"slowmo.preset={self.preset!r} is not one of {', '.join(OUTER.names())}")
        settings = {key: getattr(self, key) for key in (*KNOBS, *COMMON)}
        try:
            check_settings(**{key: value for key, value in settings.items() if value is not None})
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.knobs()


class Presets:
    """The presets as constructors of SlowMo (mixed into it)."""

    @classmethod
    def bmuf(
        cls,
        params,
        base_optimizer,
        algorithm: Algorithm,
        tau: int,
        block_lr: float = 1.0,
        block_momentum: float | None = None,
        nesterov: bool = False,
        **kwargs: Any,
    ):
        """Blockwise model-update filtering (Chen & Huo, 2016) over a Local SGD algorithm:

        Delta_t = eta Delta_{t-1} + zeta (x_{t,tau} - x_{t,0});  x_{t+1,0} = x_{t,0} + Delta_t
        (nesterov, BMUF's NBM: x_{t+1,0} = x_{t,0} + eta Delta_t + zeta (x_{t,tau} - x_{t,0})): SlowMo with the raw
        pseudo-gradient, alpha = block learning rate zeta, beta = block momentum eta (default 1 - 1/m, BMUF's rule).
        """
        if block_momentum is None:
            block_momentum = 1.0 - 1.0 / algorithm.comm.world_size
        return cls(
            params,
            base_optimizer,
            algorithm,
            tau=tau,
            alpha=block_lr,
            beta=block_momentum,
            nesterov=nesterov,
            pseudo_gradient="raw",
            **kwargs,
        )

    @classmethod
    def lookahead(
        cls, params, base_optimizer, k: int = 5, alpha: float = 0.5, algorithm: Algorithm | None = None, **kwargs: Any
    ):
        """Lookahead (Zhang et al., 2019): k fast steps, then phi <- phi + alpha (theta - phi): SlowMo with tau = k
        and beta = 0 (``algorithm`` defaults to a single worker, no communication)."""
        algorithm = algorithm if algorithm is not None else LocalSGD(Single())
        return cls(params, base_optimizer, algorithm, tau=k, alpha=alpha, beta=0.0, **kwargs)

    @classmethod
    def diloco(
        cls,
        params,
        base_optimizer,
        algorithm: Algorithm,
        tau: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        **kwargs: Any,
    ):
        """DiLoCo's outer step (Douillard et al., 2023): Nesterov SGD with lr ``outer_lr`` and momentum
        ``outer_momentum`` on the raw pseudo-gradient Delta = x_{t,0} - x_{t,tau}:

        u_{t+1} = mu u_t + Delta;  x_{t+1,0} = x_{t,0} - lr (mu u_{t+1} + Delta)

        i.e. SlowMo with nesterov=True, the raw pseudo-gradient, alpha = outer_lr, beta = outer_momentum. The base
        optimizer (AdamW in the paper) keeps its state.
        """
        return cls(
            params,
            base_optimizer,
            algorithm,
            tau=tau,
            alpha=outer_lr,
            beta=outer_momentum,
            nesterov=True,
            pseudo_gradient="raw",
            **kwargs,
        )


def _algorithm_1(cls, params, base_optimizer, algorithm: Algorithm, **kwargs: Any):
    return cls(params, base_optimizer, algorithm, **kwargs)


OUTER.register(
    "slowmo",
    label="SlowMo",
    knobs={
        "tau": "tau",
        "alpha": "alpha",
        "beta": "beta",
        "nesterov": "nesterov",
        "pseudo_gradient": "pseudo_gradient",
        "outer_optimizer": "outer_optimizer",
        "adam_beta2": "adam_beta2",
        "adam_eps": "adam_eps",
    },
)(_algorithm_1)
OUTER.register(
    "bmuf", label="BMUF", knobs={"tau": "tau", "alpha": "block_lr", "beta": "block_momentum", "nesterov": "nesterov"}
)(Presets.bmuf.__func__)
OUTER.register("lookahead", label="Lookahead", knobs={"tau": "k", "alpha": "alpha"})(Presets.lookahead.__func__)
OUTER.register("diloco", label="DiLoCo", knobs={"tau": "tau", "alpha": "outer_lr", "beta": "outer_momentum"})(
    Presets.diloco.__func__
)
