"""The virtual clock against the emulated network: the iterations/s that results/emulated_network measured, predicted.

``benchmarks/emulated_network.py`` timed 4 gloo ranks on this machine's loopback shaped by one token bucket (``tc
tbf``) at 1 and 10 Gbit/s (and 100 Mbit/s for the options beyond SlowMo), torchvision's ResNet-18 (10 classes, 11.18
M parameters), batch 16 per rank: each base algorithm without and with SlowMo, and Local SGD + SlowMo with streaming,
eager, int8 and fp4 (``configs/benchmark/emulated_network[_beyond].yaml``). Here the same cells run on 4 simulated
ranks on the virtual clock (``benchmarks/common.py: clock_times``, ResNet-18's bytes), with:

- **one calibration per measured run and rate**: a step takes the compute-only cell's measured time (1 / its
  iterations/s), the same for every cell of that run: the CPU's speed moved between the runs on 2 shared cores;
- **the shaped loopback as the link model**: one bucket of rate R shared by every rank's traffic. Every rank sends at
  once in each ring round and each gossip step, so each rank's flow gets R / 4 (one region, ``inside_gbps`` = R / 4),
  and no latency.

The measured figures are the committed ones (``results/emulated_network/*.csv``); nothing is timed here. What the
clock does not know: the 4 ranks and the shaping share 2 CPU cores (communication slows computation, and the
reverse), the gradient buckets overlap the backward pass on gloo, the token bucket's bursts.

Writes ``results/emulated_clock/``: ``emulated_clock.csv`` and its ``README.md``. Run: ``python
benchmarks/emulated_clock.py`` (a minute).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import torchvision

from slowmo.train.config import Config

from common import clock_times, config, read, suite, write_csv
from readme import record

MEASURED = Path("results/emulated_network")
SPEC = read("emulated_clock")  # configs/benchmark/emulated_clock.yaml: the measured suites and the clock scenario
STEPS = 48  # timed steps after the first (the broadcast of x_{0,0}): whole rounds of tau = 12
RANKS = 4


def gbps(rate: str) -> float:
    """``tc``'s rate (``1gbit``, ``100mbit``) in Gbit/s."""
    return float(rate[:-4]) * {"gbit": 1.0, "mbit": 1e-3}[rate[-4:]]


def predicted_its(cfg: Config, step_ms: float, rate: str, parameters: int) -> float:
    """Iterations/s of ``cfg`` on the clock: 4 ranks behind one bucket of ``rate``, a step of ``step_ms``."""
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, max_steps=STEPS + 1),
        dist=dataclasses.replace(cfg.dist, world_size=RANKS),
    )
    ranks = clock_times(cfg, parameters, step_ms=step_ms, latency_ms=0.0, regions=1, inside_gbps=gbps(rate) / RANKS)
    return STEPS / max(times[-1] - times[0] for times in ranks)  # (the slowest rank's, as the measurement)


def measured_of(rows: list[dict], rate: str, index: int, name: str, cfg: Config) -> float:
    """The measured iterations/s of a suite's cell: by its label (the beyond suite's rows), else by the algorithm and
    whether SlowMo is on, the first cell being the compute-only row."""
    mine = [r for r in rows if r["rate"] == rate]
    if "config" in mine[0]:
        return float(next(r for r in mine if r["config"] == name)["its_per_s"])
    if index == 0:
        return float(mine[0]["its_per_s"])  # (the compute-only reference comes first)
    wanted = (cfg.algorithm.name, str(cfg.slowmo.enabled))
    return float(next(r for r in mine[1:] if (r["algorithm"], r["slowmo"]) == wanted)["its_per_s"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/emulated_clock"))
    args = parser.parse_args(argv)
    parameters = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    out = []
    for name, measured_csv in SPEC["measured"].items():
        spec = suite(name)
        rows = list(csv.DictReader((MEASURED / measured_csv).open()))
        cells = {label: config(spec["base"].split(), cell, [SPEC["clock"]]) for label, cell in spec["cells"].items()}
        for rate in dict.fromkeys(r["rate"] for r in rows):
            compute = measured_of(rows, rate, 0, next(iter(cells)), next(iter(cells.values())))
            for index, (label, cfg) in enumerate(cells.items()):
                measured = measured_of(rows, rate, index, label, cfg)
                predicted = predicted_its(cfg, 1000.0 / compute, rate, parameters)
                out.append(
                    {
                        "suite": name,
                        "rate": rate,
                        "cell": label,
                        "measured_its_per_s": round(measured, 3),
                        "predicted_its_per_s": round(predicted, 3),
                        "relative_error_pct": "calibration"
                        if index == 0
                        else round(100 * (predicted / measured - 1), 1),
                    }
                )
                print(out[-1])
    write_csv(args.out / "emulated_clock.csv", out)
    record(args.out, __file__, argv)


if __name__ == "__main__":
    main()
