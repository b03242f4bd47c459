"""AllReduce against DDP, SlowMo against its base algorithm, and the outer step against one pass over |theta|.

1. Throughput. 4 gloo processes on this machine, torchvision's ResNet-18 (11.7 M parameters) on 32x32 inputs,
   batch 16 per rank, SGD with momentum 0.9: iterations/s of DDP (torch's DistributedDataParallel, 25 MB buckets),
   AllReduce (ours: bucketed all-reduces started from gradient hooks during backward), Local SGD (H = 12), Local
   SGD + SlowMo (tau = 12), SGP and SGP + SlowMo. Every configuration lives in the same 4 processes and they are
   timed in interleaved rounds of 24 steps (2 outer iterations), so that drifts of the machine hit all alike; a
   ratio is the median over rounds of the ratio within a round (the two configurations run back to back). Goals:
   AllReduce / DDP >= 1.0; Local SGD + SlowMo / Local SGD >= 0.99.
2. The outer step. One process, the same ResNet-18's flat parameters: the time of SlowMo's outer update (steps 3-4
   and the write into the model, on a single-rank communicator: no communication; 3 passes over |theta| at
   alpha = 1) against one ``torch.add_`` pass over two buffers of |theta| values. Both start from a cold cache (a
   256 MiB buffer is swept before each timing), as the outer step does in training; best of 20. Goal: <= 3
   passes' worth.

Writes ``results/speed/``: ``speed.csv`` and its ``README.md``.
Run: ``python benchmarks/speed.py`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from slowmo.comm import Single, spawn

from common import config, interleaved, optimizer, suite, with_and_without
from readme import record

SUITE = suite("speed")  # configs/benchmark/speed.yaml
CELLS = {name: config(SUITE["base"].split(), cell) for name, cell in SUITE["cells"].items()}
REFERENCE = "DDP"  # torch's, over the same ResNet-18 and base optimizer
TAU, BATCH = 12, 16  # (the suite's tau: two outer iterations per round)


def _resnet18() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _train(comm, rounds: int, steps: int, warmup: int) -> tuple[list[list[float]], list[bool]]:
    """Every configuration on these ranks, in interleaved rounds; returns each one's seconds per round, and whether
    its base algorithm keeps the ranks' parameters equal (a gradient mean, as DDP)."""
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    runs = []
    for cfg in [None, *CELLS.values()]:
        model = _resnet18()
        if cfg is None:  # the reference
            model = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = optimizer(comm, model, cfg)
        runs.append((model, opt))

    def steps_of(model, opt, count: int) -> None:
        for _ in range(count):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    for model, opt in runs:
        steps_of(model, opt, warmup)
    seconds = interleaved(comm, runs, steps_of, rounds, steps)
    return seconds, [getattr(opt, "algorithm", None) is not None and opt.algorithm.replicas_equal for _, opt in runs]


def throughput(rounds: int, steps: int, ranks: int) -> list[dict]:
    seconds, equal = spawn(_train, ranks, "gloo", args=(rounds, steps, 3), timeout=1800)[0]
    per_round = {name: [steps / t for t in s] for name, s in zip([REFERENCE, *CELLS], seconds, strict=True)}
    rate = {name: statistics.median(r) for name, r in per_round.items()}
    rows = []
    equal = [n for (n, c), e in zip(CELLS.items(), equal[1:], strict=True) if e and not c.slowmo.enabled]
    for name, against, goal in [
        *((n, REFERENCE, 1.0) for n in equal),  # the gradient mean, against DDP's
        *((outer, base, 0.99) for outer, base in with_and_without(CELLS)),  # the outer step's cost
    ]:
        rows.append(
            {
                "benchmark": "throughput",
                "setup": f"{name} vs {against}, {ranks} gloo ranks, ResNet-18",
                "value": rate[name],
                "reference": rate[against],
                "ratio": statistics.median(a / b for a, b in zip(per_round[name], per_round[against], strict=True)),
                "goal": goal,
                "unit": "iterations/s",
            }
        )
    return rows


def outer_step(repeats: int) -> list[dict]:
    """The outer update alone (a single rank), against torch.add_ over the same number of values."""
    from slowmo import LocalSGD, SlowMo, SlowMomentum

    model = _resnet18()
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = SlowMo(model, base, LocalSGD(Single()), tau=1, update=SlowMomentum(beta=0.5))
    opt._start()
    numel = opt.flat.numel
    a, b = torch.randn(numel), torch.randn(numel)

    sweep = torch.zeros(64 << 20)  # 256 MiB: more than any cache

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            sweep.add_(1.0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    best(lambda: opt._after_inner_step(True))  # first-touch of every buffer
    outer, add = best(lambda: opt._after_inner_step(True)), best(lambda: a.add_(b))
    return [
        {
            "benchmark": "outer step",
            "setup": f"SlowMo's outer update vs one add_ pass, |theta| = {numel}, {torch.get_num_threads()} thread(s)",
            "value": outer * 1e3,
            "reference": add * 1e3,
            "ratio": outer / add,
            "goal": 3.0,
            "unit": "ms",
        }
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2 * TAU)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("results/speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = outer_step(repeats=20) + throughput(args.rounds, args.steps, args.ranks)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        goal = (
            "" if row["goal"] is None else f" (goal {'<=' if row['benchmark'] == 'outer step' else '>='} {row['goal']})"
        )
        print(
            f"{row['setup']}: {row['value']:.3f} vs {row['reference']:.3f} {row['unit']}, "
            f"ratio {row['ratio']:.3f}{goal}"
        )
    record(args.out, __file__, argv)


if __name__ == "__main__":
    main()
