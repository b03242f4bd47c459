"""What a run directory holds, and what a new attempt may do with it.

A run directory holds one run: ``config.yaml`` (the settings of its last attempt that started), ``metrics.jsonl``,
``checkpoints/``, ``summary.json``, ``final.pt`` and, with W&B, ``wandb/``. Before anything in it is touched,
:func:`claim` compares what it holds with the run about to start:

- nothing: a new run;
- the same run (every setting that says what a run computes is equal; the run-control settings, marked with
  :func:`slowmo.registry.run_control`, may differ): it is resumed from its newest valid checkpoint, or there is nothing
  to do when it has completed ``train.max_steps``;
- another run (another world size, algorithm, model, seed, ...), a run longer than ``train.max_steps``, or any run under
  ``train.resume=never``: refused with one line that names what differs, unless ``train.overwrite=true``, which discards
  it (:func:`discard`) once this run has passed its own checks. A requeued or restarted attempt of the same job
  (``SLURM_RESTART_COUNT``, torchrun's restart count) resumes instead of discarding what its first attempt wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..registry import ConfigError
from . import checkpoint
from .config import Config

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "final.pt", "checkpoints", "wandb", "replicas.json")
_LISTED = 4  # differences named in a refusal
_SECTIONS = {"task", "model", "algorithm", "optimizer", "train", "dist"}  # a slowmo run's config.yaml has them


@dataclass(frozen=True)
class Claim:
    """What this attempt does with its run directory."""

    action: str  # new | resume | complete | overwrite
    newest: int | None = None  # the newest complete checkpoint's step (resume)
    summary: dict[str, Any] | None = None  # the completed run's summary.json (complete)

    def describe(self, run_dir: Path, rerun: str) -> str:
        """The first line a run prints: where it runs, what it does there, and how to resume it."""
        where = f"run directory {run_dir}"
        again = f"if it stops, rerun with {rerun} to resume it"
        if self.action == "complete":
            return (
                f"{where}: its run completed {self.summary['steps']} steps, nothing to do (raise train.max_steps to "
                "train on, or add train.overwrite=true to start again)"
            )
        if self.action == "resume":
            point = "its newest readable checkpoint" if self.newest is not None else "step 0 (it has no checkpoint)"
            return f"{where}: continuing the run it holds from {point}; {again}"
        if self.action == "overwrite":
            return f"{where}: discarding the run it holds once this run has passed its checks, then a new run; {again}"
        return f"{where}: a new run; {again}"


def settings(config: Config, run_control: bool = False) -> dict[str, Any]:
    """What a run computes: every setting but the run-control ones (with ``run_control``: those too), as
    ``{"section.key": value}``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for field in dataclasses.fields(node):
            if field.metadata.get("run_control") and not run_control:
                continue
            value = getattr(node, field.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{field.name}.")
            else:
                flat[prefix + field.name] = value

    walk(config, "")
    return flat


def first_attempt() -> bool:
    """Whether this is a job's first attempt, not a SLURM requeue or a torchrun restart of it."""
    return all(os.environ.get(key, "0") == "0" for key in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def discarding(config: Config) -> bool:
    """``train.overwrite=true`` on a job's first attempt: what the run directory holds goes, nothing is resumed."""
    return config.train.overwrite and first_attempt()


def claim(config: Config) -> Claim:
    """What this run does with ``config.run_dir``; raises ConfigError (one line) where it would lose another run."""
    run_dir = Path(config.run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return Claim("new")
    if discarding(config):
        return Claim("overwrite")
    complete = checkpoint.sorted_checkpoints(run_dir / "checkpoints")
    newest = int(complete[-1].name[5:]) if complete else None
    differences = _differences(run_dir, config, complete)
    if differences:
        listed = "; ".join(differences[:_LISTED]) + (
            f"; and {len(differences) - _LISTED} more" if len(differences) > _LISTED else ""
        )
        _refuse(run_dir, f"holds another run ({listed})", "resume it with its own settings")
    summary = _summary(run_dir)
    done = summary.get("steps", 0) if summary else 0
    reached = max(done, newest or 0)
    if reached > config.train.max_steps:
        _refuse(
            run_dir,
            f"holds a run that reached step {reached}, beyond train.max_steps={config.train.max_steps}",
            f"raise train.max_steps to {reached} or more",
        )
    if config.train.resume == "never":
        _refuse(run_dir, "holds a run and train.resume=never", "resume it (train.resume=auto)")
    # a run ended where it was evaluated at its end (its final metrics); one that failed or was stopped by a signal
    # at its last step (a peer killed during the final average) still has that end to do
    ended = summary is not None and "final" in summary
    stopped = ended and (summary.get("diverged") or {}).get("stopped") and config.train.stop_on_divergence
    if ended and (done == config.train.max_steps or stopped):
        return Claim("complete", newest, summary)
    return Claim("resume", newest)


def discard(run_dir: Path) -> None:
    """Remove what a run wrote into ``run_dir`` (nothing else that lies there)."""
    for path in [*(run_dir / name for name in RUN_FILES), *run_dir.glob("replica_[0-9]*")]:  # (an elastic run's)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _refuse(run_dir: Path, what: str, keep: str) -> None:
    raise ConfigError(
        f"run directory {run_dir} {what}; {keep}, run this one in another directory (hydra.run.dir= or run_dir=), "
        "or add train.overwrite=true to discard it"
    )


def _differences(run_dir: Path, config: Config, complete: list[Path]) -> list[str]:
    """``"key: theirs there, ours here"`` for every setting in which the directory's run differs from this one."""
    found = []
    path = run_dir / "config.yaml"
    try:
        recorded = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict) or not _SECTIONS <= recorded.keys():
        found.append(f"no readable {path.name} of a slowmo run" if path.exists() else f"no {path.name}")
    else:
        theirs, every = _flatten(recorded), settings(config, run_control=True)
        resharded = _resharded(theirs, config)
        for key, value in settings(config).items():
            if key in resharded:
                continue
            if key in theirs and theirs[key] != value:  # a key the recorded run lacks is one added since: not compared
                found.append(f"{key}: {_show(theirs[key])} there, {_show(value)} here")
        # a key this code no longer has (moved to a part's section, or removed): the run was made by other settings
        gone = [key for key in theirs if not _known(key, every) and not _other_plugin(key, theirs, every)]
        found += [f"{key}: {_show(theirs[key])} there, no such key here" for key in gone]
    world_told = any(f.startswith("dist.world_size:") for f in found) or "dist.world_size" in resharded
    for directory in complete if not world_told else []:
        ranks = (directory / checkpoint.MARKER).read_text().strip()
        if ranks != str(config.dist.world_size):
            found.append(f"{directory.name} saved by {ranks} ranks, this run has {config.dist.world_size}")
            break
    return found


def _resharded(theirs: dict[str, Any], config: Config) -> tuple[str, ...]:
    """The keys in which a run of sharded replicas may differ from the one it resumes: the ranks per replica (and so the
    world), the replicas staying the same (their checkpoint's DCP files load into another k: slowmo.replicas)."""
    world, k = theirs.get("dist.world_size"), theirs.get("dist.replica_size", 1)
    if not isinstance(world, int) or not isinstance(k, int) or k <= 1 or world % k:
        return ()
    same_replicas = world // k == config.dist.world_size // config.dist.replica_size
    return ("dist.world_size", "dist.replica_size") if same_replicas else ()


def _summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _known(key: str, every: dict[str, Any]) -> bool:
    """Whether ``key`` is a setting of this code, or lies inside one whose value is a mapping (a part's options)."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in every for n in range(len(parts), 0, -1))


def _other_plugin(key: str, theirs: dict[str, Any], every: dict[str, Any]) -> bool:
    """Whether ``key`` lies in a section whose plug-in (its ``name``) differs here: that difference is listed."""
    parts = key.split(".")
    return any(
        theirs.get(f"{section}.name", every.get(f"{section}.name")) != every.get(f"{section}.name")
        for section in (".".join(parts[:n]) for n in range(1, len(parts)))
    )


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def ensure_writable(run_dir: Path) -> None:
    """Create the run directory, or one line where it cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({error.strerror}); set hydra.run.dir "
            "(or run_dir) to a writable path"
        ) from None
