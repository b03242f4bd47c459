"""The paper's Table 2 predicted by the virtual clock: ms per iteration on ImageNet, ResNet-50, 32 nodes, 10 Gbit/s.

The paper (Wang et al., ICLR 2020, Table 2) timed each base algorithm with and without SlowMo on 32 nodes of 8 V100
GPUs linked by 10 Gbit/s Ethernet. Here each row runs on 32 simulated ranks, one per node, with the simulator's
virtual clock (``slowmo/comm/clock.py``): the real algorithms (AR-SGD's bucketed gradient mean, Local SGD's averages
every 12 steps, SGP's one-peer push-sum, OSGP's message mixed one step late, SlowMo's exact average every tau steps),
the real message sizes, and the clock's link model between the nodes. Its inputs (``configs/benchmark/table2.yaml``):

- **one calibration**: a node's step (the forward and backward passes of its 8 GPUs and their NVLink gradient
  average) takes c ms, the same for every row; c is set so that the calibration row (AR-SGD) takes the paper's time
  (c = its time minus its communication on the clock, measured with c = 0). Every other row is a prediction;
- **the network**: 10 Gbit/s between any two nodes, 0.05 ms per message; a node's messages leave one after another,
  a group's collectives run one after another (NCCL's order), the ring all-reduce at its slowest link;
- **the bytes**: ResNet-50's |theta| float32 values in every message and average. The ranks train a small model of
  P values instead and the links run P / |theta| times slower: every transfer, latency + bytes / bandwidth, takes the
  time ResNet-50's would (the gradient mean then fits one bucket where DDP's 25 MiB buckets cut ResNet-50's in about
  4: three rings' latencies fewer, 9.3 ms of AR-SGD's, absorbed by c).

What the clock does not know: how much of the backward pass the gradient buckets overlap (here none), contention
between a node's messages and the averages, stragglers and the paper's measurement noise.

Writes ``results/table2/``: ``table2.csv`` and its ``README.md``. Run: ``python benchmarks/table2.py`` (a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from slowmo.train.config import Config

from common import clock_times, config, suite, write_csv
from readme import record

SUITE = suite("table2")  # configs/benchmark/table2.yaml
STEPS = 96  # timed inner steps (after the first: the broadcast of x_{0,0}), whole rounds of tau = 12 and 48


def per_iteration_ms(cfg: Config, step_ms: float) -> float:
    """A row's ms per iteration on the clock, the mean over the 32 ranks, with a node's step taking ``step_ms``."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=STEPS + 1))
    ranks = clock_times(
        cfg,
        SUITE["parameters"],
        step_ms=step_ms,
        latency_ms=SUITE["latency_ms"],
        regions=cfg.dist.world_size,  # a node per region: every message and ring crosses the network
        between_gbps=SUITE["gbps"],
    )
    return 1000 * sum((times[-1] - times[0]) / STEPS for times in ranks) / len(ranks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/table2"))
    args = parser.parse_args(argv)
    cells = {name: config(SUITE["base"].split(), cell) for name, cell in SUITE["cells"].items()}
    paper, calibration = SUITE["paper_ms"], SUITE["calibration"]
    communication = per_iteration_ms(cells[calibration], 0.0)
    step_ms = paper[calibration] - communication
    print(
        f"calibration: {calibration} communicates {communication:.1f} ms per iteration: a node's step {step_ms:.1f} ms"
    )
    rows = []
    for name, cfg in cells.items():
        predicted = per_iteration_ms(cfg, step_ms)
        rows.append(
            {
                "row": name,
                "paper_ms": paper[name],
                "predicted_ms": round(predicted, 1),
                "relative_error_pct": "calibration"
                if name == calibration
                else round(100 * (predicted / paper[name] - 1), 1),
                "communication_ms": round(predicted - step_ms, 1),
            }
        )
        print(rows[-1])
    write_csv(args.out / "table2.csv", rows)
    record(args.out, __file__, argv, step_ms=round(step_ms, 1), calibration=calibration)


if __name__ == "__main__":
    main()
