"""The command-line face of the training stack: the per-task Hydra entrypoints call :func:`entrypoint`.

Everything a user can get wrong ends in one line on stderr and exit code 2: the command line itself (checked here
before Hydra runs, so that Hydra's own messages, some of which advise what this project then refuses, never show),
the config, the data, a run directory that holds another run. A run stopped by SIGTERM, SIGUSR1 or SIGUSR2 exits
with 3 (requeue me) and one by Ctrl-C with 130, each after its checkpoint and with one line saying how to resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..comm import CommError
from ..registry import ConfigError
from . import preemption
from .config import CONFIG_DIR, compose, renamed, validate
from .launcher import run
from .losses import NonFiniteLoss

EXPECTED = (ConfigError, ValueError, NonFiniteLoss, OSError, CommError)  # failures told in one line, no traceback
STARTED = time.time()  # directories made since are this command's


def entrypoint(task: str) -> None:
    """Run Hydra on ``configs/train_<task>.yaml`` (config.yaml with this task; ``task=`` still overrides it)."""
    try:
        check_command_line(sys.argv[1:], f"train_{task}")
    except ConfigError as error:
        _exit(f"error: {error}", 2)
    except KeyboardInterrupt:
        _exit("interrupted before the run started", preemption.INTERRUPTED_EXIT_CODE)
    hydra.main(config_path=str(CONFIG_DIR), config_name=f"train_{task}", version_base="1.3")(_main)()


def _main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    output = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the same sweep directory puts every cell back in its own directory
        rerun = f"hydra.sweep.dir={os.path.abspath(hydra_cfg.sweep.dir)}"
    elif cfg.run_dir != output:  # run_dir= on the command line: the same setting finds the run again
        rerun = f"run_dir={cfg.run_dir}"
    else:
        rerun = f"hydra.run.dir={output}"
    try:
        summary = run(cfg, run_name=hydra_cfg.job.override_dirname or None, rerun=rerun)
    except EXPECTED as error:
        _discard_if_untouched(Path(output))
        _exit(f"error: {error}", 2)
    except KeyboardInterrupt:  # a second Ctrl-C: the ranks were stopped at once
        _exit(f"interrupted: stopped at once, without a checkpoint; rerun with {rerun} to resume", 130)
    if summary["status"] in ("preempted", "interrupted"):
        requeue = preemption.requeue_wanted(summary["signal"])
        if summary["rank"] == 0:
            then = "requeueing the job" if requeue else f"rerun with {rerun} to resume"
            print(
                f"{summary['status']} at step {summary['step']}: checkpoint written to {summary['run_dir']}; {then}",
                file=sys.stderr,
                flush=True,
            )
        preemption.requeue(summary["rank"], summary["signal"])  # under submitit, rank 0 exits in here
        sys.exit(preemption.exit_code(summary["signal"]))
    if summary["rank"] != 0:
        return  # one report per job, from rank 0
    final = ", ".join(f"{k}={v:.4g}" for k, v in summary["final"].items())
    diverged = summary.get("diverged")
    note = f" (diverged at step {diverged['step']})" if diverged else ""
    print(
        f"done{note}: {summary['steps']} steps, {final}, {summary['comm_bytes'] / 2**20:.1f} MiB sent per rank, "
        f"{summary['wall_time']:.1f} s -> {summary['run_dir']}"
    )


class SweepEnd(Callback):
    """A sweep's last line: its directory, and the command that tabulates and plots its runs by cell."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = os.path.abspath(config.hydra.sweep.dir)
        print(f"sweep done: its runs are in {sweep}; compare them with: python scripts/plot.py {sweep} --out "
              f"{sweep}/plots", flush=True)  # fmt: skip


def _discard_if_untouched(directory: Path) -> None:
    """A refused command leaves nothing behind: the empty run directory Hydra made for it (and the empty parents it
    made) go; a directory that holds anything, or that was there before this command, stays."""
    cwd = Path.cwd().resolve()
    for path in [directory.resolve(), *directory.resolve().parents]:
        if path == cwd or not path.is_dir() or any(path.iterdir()) or path.stat().st_mtime < STARTED:
            return
        path.rmdir()


def _exit(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


# ------------------------------------------------------------------------------------------ the command line
def check_command_line(argv: list[str], config_name: str) -> None:
    """Compose the config as Hydra will, with every group option a sweep names; raise ConfigError (one line) where
    Hydra would fail: an unknown group option or a value that is not an option's name (``slowmo=true``), an unknown
    key (with the nearest one), a malformed override."""
    args = get_args_parser().parse_args(argv)
    if args.help:
        print(help_text(args.overrides, args.config_name or config_name))
        sys.exit(0)
    if args.hydra_help or args.info or args.shell_completion or not args.overrides:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as error:
        raise ConfigError(f"cannot read the command line: {_first_line(error)} (Hydra's override grammar)") from None
    cells = [[]]  # the first cell of a sweep, then one more for each further option of a group or top-level key
    for index, override in enumerate(parsed):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [None]
        first = override.input_line if values == [None] else f"{key}={values[0]}"
        for cell in cells:
            cell.append(first)
        if "." not in override.key_or_group:
            cells += [[*cells[0][:index], f"{key}={value}"] for value in values[1:]]
    for cell in cells:
        _compose(cell, args.config_name or config_name)


# ------------------------------------------------------------------------------------------ --help
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


def help_text(overrides: list[str], config_name: str) -> str:
    """``--help``: the config groups and their options, then every key of the config these overrides compose (the task's
    and the chosen plug-ins'), one per line, with its value and what it means (its YAML file's comment, else the
    comment of its config dataclass's field), and, in parentheses, why a task or preset set it so."""
    _compose(overrides, config_name)  # a mistake here is the usual one line
    tree = compose(overrides, config_name=config_name, with_hydra=True)
    choices = OmegaConf.to_container(tree.hydra.runtime.choices)
    files = [(CONFIG_DIR / f"{config_name}.yaml", ""), (CONFIG_DIR / "config.yaml", "")]
    files += [(CONFIG_DIR / group / f"{option}.yaml", group.replace("/", ".")) for group, option in choices.items()
              if option and (CONFIG_DIR / group / f"{option}.yaml").is_file()]  # fmt: skip
    meaning: dict[str, str] = {}  # what a key is: the comment of its group's file or of config.yaml
    note: dict[str, str] = {}  # why a task or a preset (a _global_ file) set it as it did
    for path, package in files:
        into = note if path.read_text().startswith("# @package _global_") else meaning
        into.update({k: v for k, v in _yaml_comments(path, package).items() if k not in into})
    values = OmegaConf.to_container(tree, resolve=False)
    values.pop("hydra")
    plain = OmegaConf.to_container(compose(overrides, config_name=config_name), resolve=False)
    fields = _field_comments(validate({**plain, "run_dir": "help"}))
    lines = [
        f"python {sys.argv[0]} [key=value ...] [group=option ...] [-m (a sweep: key=a,b)]",
        "",
        "Config groups (group=option):",
        *(f"  {group}: {', '.join(_options(group))}" for group in sorted(_groups())),
        "",
        "Keys (key=value) of this config, with their defaults:",
    ]
    for key, value in _leaves(values):
        group = key.removesuffix(".name").replace(".", "/")
        option = f"the {group} (an option of the group above)" if key.endswith(".name") and group in choices else ""
        comment = meaning.get(key) or fields.get(key) or option
        comment = f"{comment} ({note[key]})" if key in note and comment else note.get(key, comment)
        lines.append(f"  {key}={json.dumps(value) if not isinstance(value, str) else value}"
                     + (f"  # {comment}" if comment else ""))  # fmt: skip
    return "\n".join(lines)


def _groups() -> list[str]:
    return [str(d.relative_to(CONFIG_DIR)) for d in CONFIG_DIR.rglob("*") if d.is_dir() and any(d.glob("*.yaml"))
            and d.name not in ("launcher",)]  # fmt: skip


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), node)]


def _yaml_comments(path: Path, package: str) -> dict[str, str]:
    """``section.key`` -> the comment on its line, for a config file whose keys go under ``package`` (its group's
    path; the root for ``# @package _global_``)."""
    text = path.read_text()
    prefix = "" if "@package _global_" in text.split("\n", 1)[0] else package
    out, stack = {}, []
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if not match or line.lstrip().startswith("- "):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if match["comment"]:
            out[".".join(p for p in (prefix, *(k for _, k in stack)) if p)] = match["comment"].strip()
    return out


def _field_comments(config: Any, prefix: str = "") -> dict[str, str]:
    """``section.key`` -> the comment beside its dataclass field (``lr: float  # ...``) in the checked config, for the
    keys no YAML comment explains."""
    out: dict[str, str] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_field_comments(value, f"{prefix}{field.name}."))
            continue
        for cls in type(config).__mro__:
            if dataclasses.is_dataclass(cls):
                source = inspect.getsource(cls)
                found = re.search(rf"^ +{re.escape(field.name)}: [^#\n]*#\s*(.*)$", source, re.M) or re.search(
                    rf"^ +#\s*(.*)\n +{re.escape(field.name)}: ", source, re.M
                )  # beside the field, or on the line above it
                if found:
                    out[prefix + field.name] = found.group(1).strip()
                    break
    return out


def _compose(overrides: list[str], config_name: str) -> None:
    try:
        compose(overrides, config_name=config_name, with_hydra=True)
    except MissingConfigException as error:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        said = next((o for o in overrides if o.lstrip("+~").startswith(f"{group}=")), f"{group}={option}")
        raise ConfigError(f"{said}: no such option; {_choose(option, error.options or [])}") from None
    except ValueError as error:
        if "Config group override must be a string" not in str(error):
            raise ConfigError(_first_line(error)) from None
        cell = OverridesParser.create().parse_overrides(overrides)
        bad = next(o for o in cell if not isinstance(o.value(), str | list) and _options(o.key_or_group))
        raise ConfigError(
            f"{bad.input_line}: {bad.key_or_group} is a config group; {_choose('', _options(bad.key_or_group))}"
        ) from None
    except HydraException as error:
        cause = error.__cause__
        moved = renamed(str(getattr(cause, "full_key", "")))
        if moved:
            raise ConfigError(moved) from None
        if isinstance(cause, ConfigKeyError | ConfigAttributeError):
            raise ConfigError(_unknown_key(str(cause.full_key), overrides, config_name)) from None
        if isinstance(cause, OmegaConfBaseException):  # a value of the wrong type
            raise ConfigError(f"bad value for {cause.full_key}: {_first_line(cause)}") from None
        if "An item is already at" in str(error):
            key = str(error).split("'")[1]
            raise ConfigError(f"+{key}: {key} exists already; set it without the +: {key}=...") from None
        raise ConfigError(_first_line(error)) from None


def _unknown_key(key: str, overrides: list[str], config_name: str) -> str:
    """``train.max_step is not a key of train; did you mean train.max_steps?``"""
    section, _, name = key.rpartition(".")
    said = [(o, o.lstrip("+~").split("=")[0]) for o in overrides]
    others = [o for o, target in said if target != key and not target.startswith(f"{key}.")]  # all but the culprit
    tree = OmegaConf.to_container(compose(others, config_name=config_name, with_hydra=True), resolve=False)
    for part in section.split(".") if section else []:
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    keys = sorted(tree) if isinstance(tree, dict) else []
    where = f"of {section}" if section else "of the config"
    near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    prefix = f"{section}." if section else ""
    hint = f"did you mean {prefix}{near[0]}?" if near else f"the keys {where} are {', '.join(keys)}"
    return f"{key} is not a key {where}; {hint}"


def _options(group: str) -> list[str]:
    """A config group's options (the YAML files of ``configs/<group>/``); empty for what is not a group here."""
    folder = CONFIG_DIR / group
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def _choose(wrong: str, options: list[str]) -> str:
    near = difflib.get_close_matches(wrong, options, n=1, cutoff=0.6) if wrong else []
    return f"choose one of {', '.join(options)}" + (f" (did you mean {near[0]}?)" if near else "")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
