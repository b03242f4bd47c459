"""What the benchmarks share: their configurations (``configs/benchmark/<suite>.yaml``), the optimizer of one, built
by the training stack's own builder, the timed loop, a run's steps on the virtual clock, and the GPU benchmarks'
command line."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from slowmo import report
from slowmo.comm import spawn
from slowmo.comm.clock import Clock
from slowmo.inner import DistributedOptimizer
from slowmo.train import build_optimizer, compose, validate
from slowmo.train.config import CONFIG_DIR, Config, cells_of, to_dict

SUITES = CONFIG_DIR / "benchmark"


def read(name: str) -> dict:
    """``configs/benchmark/<name>.yaml`` as it is written."""
    return yaml.safe_load((SUITES / f"{name}.yaml").read_text())


def suite(name: str) -> dict:
    """``configs/benchmark/<name>.yaml``: a benchmark's configurations, so that its code names no plug-in. ``base``:
    the overrides every cell shares; ``cells``: a list of lines of overrides, each a sweep in Hydra's grammar
    (``algorithm=a,b slowmo=off,on``: a cell per combination, the last varying fastest) named as
    :func:`slowmo.report.names` names cells (the registries' labels, ``Local SGD + SlowMo``, and the settings that
    tell them apart), or ``{name: line}``, one cell named by the file. Returns the file's mapping with ``cells`` as
    {name: overrides}; its other keys are the benchmark's own."""
    spec = read(name)
    base = spec.get("base", "").split()
    cells: list[tuple[str | None, list[str]]] = []
    for line in spec["cells"]:
        if isinstance(line, dict):
            cells += [(key, value.split()) for key, value in line.items()]
        else:
            cells += [(None, cell) for cell in cells_of(line.split())]
    unnamed = [cell for key, cell in cells if key is None]
    names = iter(report.names([to_dict(config(base, cell)) for cell in unnamed]))
    spec["cells"] = {key or next(names): cell for key, cell in cells}
    return spec


def config(*overrides: list[str]) -> Config:
    """The checked config of these overrides (a suite's ``base``, then a cell's): a later one replaces an earlier one
    of the same key, and ``~key`` deletes it."""
    merged: dict[str, str] = {}
    for line in overrides:
        for override in line:
            key = override.lstrip("~+").split("=")[0]
            merged.pop(key, None)
            merged[key] = override
    return validate(compose([*merged.values(), "run_dir=runs/benchmark"]))  # (no run: nothing is written there)


def with_and_without(cells: dict[str, Config]) -> list[tuple[str, str]]:
    """(X + the outer step, X): each cell with an outer step and the cell that is the same without it."""

    def key(cfg: Config) -> tuple:
        flat = report.settings({"config": to_dict(cfg)})
        return tuple(sorted((k, repr(v)) for k, v in flat.items() if not k.startswith("slowmo.")))

    bases = {key(cfg): name for name, cfg in cells.items() if not cfg.slowmo.enabled}
    return [(name, bases[key(cfg)]) for name, cfg in cells.items() if cfg.slowmo.enabled and key(cfg) in bases]


def optimizer(comm, model: torch.nn.Module, cfg: Config) -> DistributedOptimizer:
    """The run's optimizer of ``cfg`` (its base optimizer, base algorithm and outer step) over ``model``."""
    return build_optimizer(cfg, model, comm)


def interleaved(comm, runs: list[tuple], steps_of, rounds: int, steps: int) -> list[list[float]]:
    """Each of ``runs`` (model, optimizer) timed for ``steps`` steps (``steps_of(model, opt, steps)``) in each of
    ``rounds`` rounds, one after the other within a round, the ranks passing a barrier around each: drifts of the
    machine hit all alike. Returns each run's seconds per round."""
    seconds: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for index, (model, opt) in enumerate(runs):
            comm.barrier()
            start = time.perf_counter()
            steps_of(model, opt, steps)
            comm.barrier()
            seconds[index].append(time.perf_counter() - start)
    return seconds


def timed_steps(
    comm,
    model: torch.nn.Module,
    opt,
    batch: int,
    steps: int,
    warmup: int,
    sent: list[int] | None = None,
    sync_start: bool = True,
) -> tuple[float, float]:
    """Train on one fixed random CIFAR-shaped batch; returns (start, end) of the ``steps`` timed steps on this
    rank's clock, end when this rank's last step returns. The first ``warmup`` steps, which include the broadcast of
    rank 0's model, are not timed. ``sync_start``: the ranks pass a barrier before the timed steps; without it they
    pass one before the warm-up and each starts its clock at its own first timed step, so that communication left in
    flight by the warm-up (an eager all-reduce, overlapped gossip) is not waited for outside the window: each rank's
    window is then ``steps`` steps of the steady state. ``sent``, if given, receives the bytes this rank sent in each
    timed step."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if not sync_start:
        comm.barrier()
    for step in range(warmup + steps):
        if step == warmup:
            if sync_start:
                comm.barrier()
            start = time.perf_counter()
        counted = sent is not None and step >= warmup
        before = comm.stats()["total"] if counted else 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if counted:
            sent.append(comm.stats()["total"] - before)
    end = time.perf_counter()
    opt.state_dict()  # completes the communication still in flight (its state is saved complete)
    comm.barrier()
    return start, end


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys, in order) as a CSV file with a header, its directory made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [module for _ in range(4) for module in (torch.nn.Linear(64, 64), torch.nn.ReLU())][:-1]
    return torch.nn.Sequential(*layers)  # 4 equal layers: up to 4 streaming fragments, of equal bytes


def _replay(comm, cfg: Config) -> list[float]:
    model = _small_model()
    opt = optimizer(comm, model, cfg)
    generator = torch.Generator().manual_seed(comm.rank)
    times = []
    for _ in range(cfg.train.max_steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        comm.computed()
        opt.step()
        times.append(comm.time())
    opt.algorithm.flush()  # (OSGP's last message: the time covers what was sent)
    times[-1] = comm.time()
    return times


def clock_times(cfg: Config, parameters: int, **changes: Any) -> list[list[float]]:
    """Each rank's time on the virtual clock (``cfg.dist.clock`` with ``changes``) after each of the run's inner steps
    of ``cfg``'s optimizer (base algorithm, outer step, fragments) with random gradients, on a small model whose links
    run slower by its size over ``parameters`` (``inside_gbps``, ``between_gbps`` are the big model's): every transfer,
    latency + bytes / bandwidth, takes the time the big model's would, and the clock's time does not depend on the
    values. The last step's time includes OSGP's last message."""
    small = sum(p.numel() for p in _small_model().parameters())

    def scaled(gbps: Any) -> Any:
        if isinstance(gbps, list):
            return [scaled(row) for row in gbps]
        return None if gbps is None else gbps * small / parameters

    changes = {key: scaled(value) if key.endswith("_gbps") else value for key, value in changes.items()}
    clock = Clock(dataclasses.replace(cfg.dist.clock, **changes), cfg.dist.world_size, cfg.seed)  # (checked there)
    return spawn(_replay, cfg.dist.world_size, "simulated", args=(cfg,), clock=clock)


def gpu_arguments(doc: str, out: str, small: str, argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """A GPU benchmark's command line: ``--out`` (default ``out``), ``--device cuda|cpu`` and ``--small`` (``small``
    says what: toy sizes, the smoke run the test suite makes on the CPU); cuda without a visible GPU fails in one
    line. Returns the arguments and the machine's name (the GPU's, or the CPU's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help=small)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; run on a GPU machine or pass --device cpu --small for a smoke run")
    if args.device == "cpu" and not args.small:
        parser.error("the full sizes are for a GPU; on the CPU pass --small")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return args, machine
