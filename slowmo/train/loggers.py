"""Where metrics go: ``<run_dir>/metrics.jsonl`` always, W&B when ``logger.wandb=true`` (offline without an API key)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import Config, to_dict


class JsonlLogger:
    """One JSON object per line; appends, so a resumed run continues the same file."""

    def __init__(self, path: Path, resume_step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step == 0 and path.exists():
            path.unlink()
        elif path.exists():  # drop lines past the checkpoint we resume from: they will be logged again
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbLogger:
    """A W&B run: grouped by sweep, named by its overrides, with the full config; offline when no API key. ``run_id``
    is the run's own (kept in its checkpoints), so a resumed run continues its W&B run and a run that starts again at
    step 0, or replaces a discarded one, gets a new one."""

    def __init__(self, cfg: Config, config_dict: dict, run_dir: Path, run_name: str, group: str, run_id: str) -> None:
        import wandb

        mode = cfg.logger.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self._run = wandb.init(
            project=cfg.logger.project,
            group=cfg.logger.group or group,
            name=cfg.logger.name or run_name,
            config=config_dict,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            reinit=True,
        )

    def log(self, record: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """Every logger of rank 0: ``metrics.jsonl`` (continued from the progress's step when resumed) and, with
    ``logger.wandb``, W&B, named by the run's overrides and grouped by its parent directory. Other ranks: none."""

    def __init__(
        self, cfg: Config | None = None, run_dir: Path | None = None, run_name: str | None = None, progress=None
    ) -> None:
        self._loggers: list = []
        if cfg is None:
            return
        self._loggers.append(JsonlLogger(run_dir / "metrics.jsonl", progress.step))
        if cfg.logger.wandb:
            name, group = run_name or run_dir.name, run_dir.parent.name
            self._loggers.append(WandbLogger(cfg, to_dict(cfg), run_dir, name, group, progress.run_id))

    def log(self, record: dict[str, Any]) -> None:
        for logger in self._loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()
