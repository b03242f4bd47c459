"""The simulator's cost, and SlowMo's memory with its outer state whole and sharded (``slowmo/mean=sharded``).

1. Throughput: 8 simulated ranks in one process (batch b each, AllReduce and Local SGD) against one rank with
   batch 8b, on CIFAR-shaped random data and ResNet-20; samples/s of each and their ratio (target >= 0.8).
2. Memory: 4 real gloo processes per configuration, ResNet-18 (CIFAR stem, |θ| = 11.2 M, 44.7 MB): Local SGD
   alone, then with SlowMo (tau = 2) unsharded and sharded. Reported per rank: the bytes of SlowMo's own state
   (x_{t,0} and v = gamma u), and the extra resident memory over Local SGD alone, the largest after any of 6 steps
   (targets: 2|θ|/n + 1 MiB sharded, 2|θ| + 1 MiB unsharded). Every configuration first runs both outer steps
   on a tiny model, so that the pages of code and of the allocator's small pools they touch count in all alike.

Writes ``results/simulator/``: ``simulator.csv`` and its ``README.md``.
Run: ``python benchmarks/simulator.py`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import csv
import resource
from pathlib import Path

import torch

from slowmo.comm import Single, spawn
from slowmo.models import ResNet20, build_model
from slowmo.outer.parts import MEANS
from slowmo.train.config import Config

from common import config, optimizer, read, suite, timed_steps
from readme import record

MiB = 2**20


MODEL = read("simulator_memory")["model"]


def cells(name: str) -> dict[str, Config]:
    """configs/benchmark/simulator_<name>.yaml's configurations by name (the reference first)."""
    spec = suite(f"simulator_{name}")
    return {label: config(spec["base"].split(), cell) for label, cell in spec["cells"].items()}


def _train(comm, batch: int, steps: int, cfg: Config) -> tuple[float, float]:
    torch.manual_seed(0)
    model = ResNet20(16, 10)
    return timed_steps(comm, model, optimizer(comm, model, cfg), batch, steps, warmup=2)


def _elapsed(spans: list[tuple[float, float]]) -> float:
    """From the first rank's start to the last rank's end (simulated ranks take turns, so no single rank's clock
    covers the others' work)."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


def throughput(batch: int, steps: int, ranks: int) -> list[dict]:
    rows = []
    configs = cells("throughput")
    single = _elapsed([_train(Single(), batch * ranks, steps, next(iter(configs.values())))])
    rows.append(
        {
            "benchmark": "throughput",
            "setup": f"1 rank, batch {batch * ranks}, {next(iter(configs))}",
            "samples_per_s": batch * ranks * steps / single,
            "ratio": 1.0,
        }
    )
    for name, cfg in configs.items():
        elapsed = _elapsed(spawn(_train, ranks, "simulated", args=(batch, steps, cfg)))
        sps = batch * ranks * steps / elapsed
        rows.append(
            {
                "benchmark": "throughput",
                "setup": f"{ranks} simulated ranks, batch {batch} each, {name}",
                "samples_per_s": sps,
                "ratio": sps / rows[0]["samples_per_s"],
            }
        )
    return rows


def _memory(comm, cfg: Config) -> dict:
    torch.manual_seed(0)
    for outer in [c for c in cells("memory").values() if c.slowmo.enabled]:  # every code path of each outer step
        tiny = torch.nn.Linear(64, 64)  # touched in every configuration, on a tiny model: what differs below is data,
        warm = optimizer(comm, tiny, outer)  # not pages of code or allocator pools
        for _ in range(4):
            tiny(torch.randn(8, 64)).sum().backward()
            warm.step()
    del tiny, warm
    model = build_model(config([MODEL]).model, num_classes=10, input_shape=(3, 32, 32))
    opt = optimizer(comm, model, cfg)
    peak = 0
    for _ in range(6):
        for p in model.parameters():
            p.grad.fill_(1e-3)
        opt.step()
        peak = max(peak, _resident())
    update = opt.state_dict().get("outer", {}).get("update", {})  # x_{t,0} and v: this rank's part of them
    state = sum(t.numel() * t.element_size() for t in update.values() if isinstance(t, torch.Tensor))
    return {"peak_rss": peak, "outer_state": state, "params": sum(p.numel() * 4 for p in model.parameters())}


def _resident() -> int:
    """This process's resident memory now (bytes): the peak since start (ru_maxrss) is set by importing torch."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory(ranks: int) -> list[dict]:
    configs = cells("memory")
    results = {name: spawn(_memory, ranks, "gloo", args=(cfg,)) for name, cfg in configs.items()}
    alone, *outer = configs  # the base alone is the reference
    params = results[alone][0]["params"]
    rows = []
    for name in outer:
        extra = max(r["peak_rss"] - b["peak_rss"] for r, b in zip(results[name], results[alone], strict=True))
        sharded = MEANS[configs[name].slowmo.mean.name].build.shards_state  # 1/m of the outer state per rank
        target = (2 * params / ranks if sharded else 2 * params) + MiB
        rows.append(
            {
                "benchmark": "memory",
                "setup": f"{name}, {ranks} gloo ranks, ResNet-18",
                "outer_state_mib_per_rank": max(r["outer_state"] for r in results[name]) / MiB,
                "extra_resident_mib_per_rank": extra / MiB,
                "target_mib": target / MiB,
                "param_mib": params / MiB,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/simulator"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = throughput(args.batch, args.steps, 8) + memory(4)
    for row in rows:
        print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(args.out / "simulator.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    record(args.out, __file__, argv)


if __name__ == "__main__":
    main()
