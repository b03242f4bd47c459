"""The run's configuration. The YAML tree under ``configs/`` is the one source of defaults; each section is checked
against the dataclass of what it configures, and the plug-in sections against the dataclass their plug-in
registered (``algorithm`` against the chosen algorithm's, ``data`` against the chosen task's, ...), so an unknown
key (``+key=value`` included), a wrong type or an unknown name fails at start with one line naming it.

From the command line Hydra composes the tree (``experiments/<task>/train.py key=value ...``); from Python,
:func:`compose` does the same, and :func:`validate` (hence :func:`slowmo.train.run`) also takes a plain dict of
overrides, composed onto the tree first: ``{"algorithm": {"name": X}}`` selects ``configs/algorithm/X.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..algorithms import ALGORITHMS
from ..comm import elastic
from ..comm.clock import ClockConfig
from ..comm.spawn import BACKENDS
from ..models import MODELS, models_taking
from ..outer.config import OuterConfig
from ..outer.parts import MEANS, UPDATES
from ..registry import ConfigError, Registry, check_minimums, setting
from ..tasks import TASKS
from .optimizers import OPTIMIZERS
from .precision import DTYPES
from .schedule import SCHEDULES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class LoggerConfig:
    wandb: bool  # log to W&B too (logger=wandb); metrics.jsonl is always written
    project: str  # the W&B project
    group: str | None  # default: the sweep's name, or the run directory's parent
    name: str | None  # default: the run's overrides
    mode: str  # auto (online with an API key, else offline) | online | offline
    log_every: int = setting(minimum=1)  # inner steps between train-loss records
    progress: bool  # a progress bar on rank 0


@dataclass
class DistConfig:
    backend: str = setting(run_control=True)  # simulated | gloo | nccl
    device: str = setting(run_control=True)  # auto (the local GPU under nccl, else the CPU) | cpu | cuda
    world_size: int = setting(minimum=1)  # ranks to simulate or spawn locally (torchrun/srun: the job's, recorded)
    replica_size: int = setting(minimum=1)  # k ranks per replica, sharding the model with FSDP2 (1: whole copies)
    timeout_s: float = setting(run_control=True, minimum=0.001)  # seconds a rank waits for a peer, then fails
    clock: ClockConfig | None = None  # dist/clock=<scenario>: the simulator's virtual time (slowmo.comm.clock)


@dataclass
class ElasticDistConfig(elastic.ElasticSettings, DistConfig):
    """``dist=torchft``: every backend's keys, and the elastic ones (:class:`slowmo.comm.elastic.ElasticSettings`)."""


@dataclass
class TrainConfig:
    max_steps: int = setting(run_control=True, minimum=1)  # inner steps of the run
    eval_every: int = setting(run_control=True, minimum=0, why="0: only at the end")
    checkpoint_every: int = setting(run_control=True, minimum=0, why="0: no periodic checkpoints")
    keep_checkpoints: int = setting(run_control=True, minimum=0, why="0 keeps them all")  # the newest kept
    resume: str = setting(run_control=True)  # auto: continue this directory's run | never: refuse one that has a run
    overwrite: bool = setting(run_control=True)  # discard what the run directory holds and start at step 0
    signal_check_every: int = setting(run_control=True, minimum=0, why="0: signals are not checked")
    stop_on_divergence: bool = setting(run_control=True)  # end a run whose train loss climbs back to its start
    precision: str  # fp32 | bf16 | fp16 (autocast; fp16 adds a loss scaler agreed by all ranks)
    clip_grad_norm: float | None  # max L2 norm of the gradient each rank's base step uses; null: no clipping
    channels_last: bool | None = setting(run_control=True)  # convolutions channels-last; null: on for cuda
    deterministic: bool = setting(run_control=True)  # deterministic CUDA kernels (bit-exact resume on GPUs)


@dataclass
class Config:
    """A checked run configuration; ``task``, ``data``, ``model``, ``algorithm``, ``optimizer`` and ``schedule`` are
    instances of their plug-ins' dataclasses."""

    task: Any
    data: Any
    model: Any
    algorithm: Any
    slowmo: OuterConfig
    optimizer: Any
    schedule: Any
    logger: LoggerConfig = setting(run_control=True)
    dist: Any  # DistConfig, or ElasticDistConfig for dist=torchft
    train: TrainConfig
    seed: int  # the run's seed: the initial model, the data order, each rank's random stream
    run_dir: str = setting(run_control=True)  # where the run writes (default: Hydra's run directory)
    experiment: str | None = setting(run_control=True, default=None)  # the preset's name, recorded in the run


ConfigStore.instance().store(name="schema", node=Config)  # configs/config.yaml starts from it: Hydra then names
# the section of a misspelt command-line key (train.max_step: "Key 'max_step' not in 'TrainConfig'")

PLUGINS: dict[str, Registry] = {
    "task": TASKS,
    "model": MODELS,
    "algorithm": ALGORITHMS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
}
CHOICES = {
    ("dist", "backend"): (*BACKENDS, elastic.BACKEND),
    ("dist", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): tuple(DTYPES),
    ("train", "resume"): ("auto", "never"),
    ("logger", "mode"): ("auto", "online", "offline"),
}


def compose(
    overrides: list[str] | tuple[str, ...] = (), config_name: str = "config", with_hydra: bool = False
) -> DictConfig:
    """The tree composed with command-line style ``overrides`` (``["algorithm=<name>", "slowmo.update.beta=0.7",
    "+experiment=quickstart"]``), as ``experiments/<task>/train.py`` would; not yet checked (see :func:`validate`)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def sweep(experiment: str) -> list[list[str]]:
    """The cells of an experiment preset's sweep (its ``hydra.sweeper.params``, in Hydra's override grammar), each as
    the overrides that make it, in the order Hydra's basic sweeper runs them (the last parameter varies fastest)."""
    params = compose([f"+experiment={experiment}"], with_hydra=True).hydra.sweeper.params or {}
    return cells_of([f"{key}={value}" for key, value in params.items()])


def cells_of(overrides: list[str]) -> list[list[str]]:
    """The cells a command line's ``overrides`` sweep (``algorithm=a,b slowmo=off,on``: one per combination, the last
    varying fastest, as Hydra's basic sweeper runs them), each as the overrides that make it."""
    axes = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in OverridesParser.create().parse_overrides(overrides)
    ]
    return [list(cell) for cell in itertools.product(*axes)]


def from_dict(sections: Mapping[str, Any]) -> dict[str, Any]:
    """The tree composed with the group choices a dict of overrides makes (``name`` of a plug-in section,
    ``experiment``), with the dict merged on top."""
    choices = [
        f"{group}={sections[group]['name']}"
        for group, registry in PLUGINS.items()
        if isinstance(sections.get(group), Mapping) and sections[group].get("name") in registry
    ]
    outer = sections.get("slowmo") if isinstance(sections.get("slowmo"), Mapping) else {}
    choices += [  # the outer step's parts: their YAML files' defaults, then the dict's keys
        f"slowmo/{part}={outer[part]['name']}"
        for part, registry in (("update", UPDATES), ("mean", MEANS))
        if isinstance(outer.get(part), Mapping) and outer[part].get("name") in registry
    ]
    if sections.get("experiment"):
        choices.append(f"+experiment={sections['experiment']}")
    try:
        tree = OmegaConf.to_container(compose(choices), resolve=False)
    except HydraException as error:  # e.g. a registered plug-in without its YAML file
        raise ConfigError(f"cannot compose configs/ with {' '.join(choices)}: {str(error).splitlines()[0]}") from None
    merged = OmegaConf.merge(tree, {"run_dir": "runs/default", **sections})  # no Hydra run directory here
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def _typed(cls: type, values: Any, section: str) -> Any:
    """``values`` checked against the dataclass ``cls``: one line naming the key on an unknown key or a bad value."""
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        renamed = getattr(cls, "RENAMED", {}).get(str(key).split(".")[0])
        if renamed:
            raise ConfigError(f"{section}.{str(key).split('.')[0]} {renamed}") from None
        near = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(cls)], n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join(p for p in (section, near[0]) if p)}?" if near and near[0] != key else ""
        key = ".".join(part for part in (section, key) if part)
        raise ConfigError(f"bad config key {key!r}: {str(error).splitlines()[0]}{hint}") from None
    check_minimums(typed, section)
    if hasattr(typed, "check"):
        typed.check()
    return typed


def _outer(values: Any) -> OuterConfig:
    """The slowmo section, its update and mean checked against the dataclasses of the parts they name."""
    parts = {}
    for key, registry in (("update", UPDATES), ("mean", MEANS)):
        given = values.get(key) if isinstance(values, Mapping) else None
        parts[key] = _typed(_entry(registry, f"slowmo.{key}", given).config, given, f"slowmo.{key}")
    outer = _typed(OuterConfig, {k: v for k, v in values.items() if k not in parts}, "slowmo")
    outer.update, outer.mean = parts["update"], parts["mean"]
    return outer


def _entry(registry: Registry, section: str, values: Any):
    name = values.get("name") if isinstance(values, Mapping) else None
    if name not in registry:
        raise ConfigError(f"{section}.name={name!r} is not one of {', '.join(registry.names())}")
    return registry[name]


def validate(cfg: DictConfig | Mapping[str, Any] | Config) -> Config:
    """A checked :class:`Config` from a composed tree (Hydra's), or from a dict of overrides (composed here)."""
    if isinstance(cfg, Config):
        return cfg
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else from_dict(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad config: {str(error).splitlines()[0]}") from None
    sections: dict[str, Any] = {"slowmo": _outer(raw.get("slowmo", {}))}  # (tau before the algorithm's period)
    for section, registry in PLUGINS.items():
        entry = _entry(registry, section, raw.get(section))
        sections[section] = _typed(entry.config, raw[section], section)
        if section == "task":
            sections["data"] = _typed(entry.extra["data"], raw.get("data", {}), "data")
    dist = raw.get("dist", {})
    elastic_run = isinstance(dist, Mapping) and dist.get("backend") == elastic.BACKEND
    for section, cls in (
        ("logger", LoggerConfig),
        ("dist", ElasticDistConfig if elastic_run else DistConfig),
        ("train", TrainConfig),
    ):
        sections[section] = _typed(cls, raw.get(section, {}), section)
    config = _typed(Config, raw, "")  # the top level: unknown keys (+key=value) and the plain values
    for key, value in sections.items():
        setattr(config, key, value)
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.dist.replica_size > 1:
        _check_sharded(config)
    elif config.dist.backend != elastic.BACKEND:  # (an elastic run's parts are checked with its own rules)
        config.slowmo.check_parts()
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(allowed)}")
    task = TASKS[config.task.name]
    if task.extra["inputs"] not in MODELS[config.model.name].extra["takes"]:
        raise ConfigError(
            f"task {config.task.name} needs {task.extra['needs']}: model.name is "
            f"{config.model.name!r}, use one of {', '.join(models_taking(task.extra['inputs']))}"
        )
    if config.train.clip_grad_norm is not None and not config.train.clip_grad_norm > 0:
        raise ConfigError(f"train.clip_grad_norm must be > 0 or null (no clipping), got {config.train.clip_grad_norm}")
    preset_task = _preset_task(config.experiment)
    if preset_task and preset_task != config.task.name:
        raise ConfigError(
            f"+experiment={config.experiment} is the preset of task {preset_task}, but the task is "
            f"{config.task.name}; run experiments/{preset_task}/train.py"
        )
    if config.dist.backend == elastic.BACKEND:
        _check_elastic(config)
    clock = config.dist.clock
    if clock is not None:
        clock.check(config.dist.world_size)
    if clock is not None and config.dist.backend != "simulated":
        raise ConfigError(
            f"dist/clock={clock.name} is the simulator's virtual time: use dist=simulated (dist={config.dist.backend} "
            "runs in real time)"
        )
    if config.dist.backend == "nccl" and config.dist.device == "cpu":
        raise ConfigError(
            "dist.backend=nccl moves only GPU tensors but dist.device=cpu; use dist.device=cuda (or auto), "
            "or dist.backend=gloo to train on the CPU"
        )


def _check_elastic(config: Config) -> None:
    """dist=torchft (phase 1) runs Local SGD under SlowMo or a preset, one process per replica: what else a run asks
    for is refused here, in one line that says why, from what each part declares."""
    algorithms = " or ".join(entry.label for entry in ALGORITHMS if entry.config.elastic)
    works = f"dist=torchft runs {algorithms} under SlowMo or a preset, the whole model averaged exactly (phase 1)"
    missing = elastic.available()
    if missing:
        raise ConfigError(missing)
    if not config.slowmo.enabled:
        raise ConfigError(
            f"{works}; slowmo=off has no outer step to vote on (slowmo=on with slowmo.update.beta=0 is the same)"
        )
    reason = config.algorithm.not_elastic()
    if reason:
        raise ConfigError(f"{works}; algorithm={config.algorithm.name} does not: {reason}")
    config.slowmo.check_parts(elastic=works)
    if config.train.precision == "fp16":
        raise ConfigError(f"{works}; fp16's loss scaler votes on every inner step (use train.precision=bf16 or fp32)")
    if config.dist.device == "cuda":
        raise ConfigError(f"{works}; on the CPU, over torchft's gloo process group (set dist.device=cpu or auto)")
    if config.train.max_steps % config.slowmo.tau:
        raise ConfigError(
            f"dist=torchft ends on an outer step (every replica then holds x_T,0): set train.max_steps to a multiple "
            f"of slowmo.tau = {config.slowmo.tau}, got {config.train.max_steps}"
        )
    if config.dist.min_replicas > config.dist.world_size:
        raise ConfigError(
            f"dist.min_replicas={config.dist.min_replicas} is more than the dist.world_size={config.dist.world_size} "
            "replicas: no round could commit"
        )


def _check_sharded(config: Config) -> None:
    """dist.replica_size = k > 1: replicas of k ranks sharding the model with FSDP2, the algorithm across replicas on
    each rank's shard (slowmo.replicas). What does not combine with it is refused here, in one line that says why."""
    dist, k = config.dist, config.dist.replica_size
    works = f"dist.replica_size={k} shards each replica's model with FSDP2 over torch.distributed"
    if dist.backend not in ("gloo", "nccl"):
        elastic_next = " (elastic sharded replicas are the next step)" if dist.backend == elastic.BACKEND else ""
        raise ConfigError(f"{works}: use dist=gloo or dist=nccl, not dist={dist.backend}{elastic_next}")
    reason = config.algorithm.not_in_shards()
    if reason:
        raise ConfigError(f"{works}; algorithm={config.algorithm.name} does not run on it: {reason}")
    if config.train.precision == "fp16":
        raise ConfigError(f"{works}; fp16's loss scaler does not run on its sharded gradients (use bf16)")
    if config.slowmo.enabled:
        config.slowmo.check_parts(sharded=works)


def check_world_size(config: Config) -> None:
    """Once the world size is known (the config's, or the launch's under torchrun/srun): whole replicas of
    dist.replica_size ranks."""
    world, k = config.dist.world_size, config.dist.replica_size
    if world % k:
        raise ConfigError(
            f"dist.replica_size={k}: the {world} ranks are not a whole number of replicas of {k} ranks; launch a "
            f"multiple of {k} ranks (a replica is k consecutive ranks: with torchrun or SLURM, one node's)"
        )


def renamed(key: str) -> str | None:
    """The one line for a config key that a better spelling replaced (``slowmo.compression``), or None."""
    section, _, name = key.partition(".")
    cls = get_type_hints(Config).get(section)
    message = getattr(cls, "RENAMED", {}).get(name.split(".")[0]) if name else None
    return f"{section}.{name.split('.')[0]} {message}" if message else None


def _preset_task(experiment: str | None) -> str | None:
    """The task an experiment preset is for (the ``override /task:`` of ``configs/experiment/<name>.yaml``)."""
    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    if not experiment or not path.is_file():
        return None
    match = re.search(r"override /task: *(\S+)", path.read_text())
    return match.group(1) if match else None


def to_dict(config: Config) -> dict[str, Any]:
    """The plain nested dict of a checked config (what ``config.yaml`` and W&B record)."""
    return OmegaConf.to_container(OmegaConf.structured(config))  # type: ignore[return-value]
