"""Plug-ins registered by name: every algorithm, gossip graph, task, model, optimizer, schedule and outer preset
registers its name, its config dataclass and its builder in the module that defines it, and the harness builds
everything through these registries (no lists of names anywhere else).

    ALGORITHMS = Registry("algorithm", "slowmo.algorithms")              # in slowmo/algorithms/base.py

    @ALGORITHMS.register("<name>", MyAlgorithmConfig, label="My algorithm")   # in slowmo/algorithms/<name>.py
    class MyAlgorithm(Algorithm): ...

A registry finds its plug-ins by importing every module of its package the first time it is asked for a name, so a
new plug-in is one new module (plus its YAML file under ``configs/``) and nothing else. The packages whose
registries take plug-ins from outside the source tree (algorithms, tasks, models) extend their ``__path__`` with
``pkgutil.extend_path``: a directory on ``PYTHONPATH`` holding ``slowmo/algorithms/<name>.py`` adds an algorithm.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line that says what to change."""


def setting(*, run_control: bool = False, minimum: float | None = None, why: str = "", default: Any = MISSING) -> Any:
    """A config field with what the harness must know of it beyond its type:

    - ``run_control``: it says how a run is carried out (where its data lie, how its batches are loaded, how long it
      goes on, when it evaluates, logs or checkpoints), not what it computes, so it may change when the run is
      resumed; every other field must stay as the run directory's run had it (:mod:`slowmo.train.rundir`);
    - ``minimum``: a count or a size below which the value means nothing; a smaller one is refused in one line,
      ``"<section>.<key> must be >= <minimum> (<why>), got <value>"``, before anything runs (``None`` passes).
    """
    return field(default=default, metadata={"run_control": run_control, "minimum": minimum, "why": why})


def check_minimums(values: Any, section: str) -> None:
    """ConfigError (one line) for the first field of the dataclass ``values`` (or of a dataclass in it) below its
    ``setting(minimum=...)``."""
    for spec in fields(values):
        value, minimum = getattr(values, spec.name), spec.metadata.get("minimum")
        if is_dataclass(value):
            check_minimums(value, ".".join(part for part in (section, spec.name) if part))
        elif minimum is not None and value is not None and value < minimum:
            why = f" ({spec.metadata['why']})" if spec.metadata.get("why") else ""
            key = ".".join(part for part in (section, spec.name) if part)
            raise ConfigError(f"{key} must be >= {minimum}{why}, got {value}")


@dataclass(frozen=True)
class Entry:
    """One registered plug-in: its name, the dataclass of its config section, its builder, the name tables and
    figures show (``label``) and anything else its registry asks for (``extra``)."""

    name: str
    config: type | None
    build: Callable[..., Any]
    label: str
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Plug-ins of one kind, found in the modules of ``package``."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(
        self, name: str, config: type | None = None, label: str | None = None, **extra: Any
    ) -> Callable[[Callable], Callable]:
        """Decorator: register the decorated builder (a function or a class) under ``name``."""

        def add(build: Callable) -> Callable:
            if name in self._entries and self._entries[name].build is not build:
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice: in {self._entries[name].build.__module__} "
                    f"and in {build.__module__}"
                )
            self._entries[name] = Entry(name, config, build, label or name, extra)
            return build

        return add

    def _discover(self) -> None:
        if self._discovered:
            return
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            importlib.import_module(f"{self.package}.{info.name}")
        self._discovered = True

    def __getitem__(self, name: str) -> Entry:
        self._discover()
        if name not in self._entries:
            raise ValueError(f"{self.kind} {name!r} is not one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._discover()
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        """The registered names, in the order their modules registered them."""
        self._discover()
        return list(self._entries)
