"""Iterations/s over an emulated network: each algorithm with and without SlowMo, and the options beyond SlowMo.

The script creates a network namespace (``ip netns add``; root needed), brings its loopback up and shapes it with
a token bucket (``tc qdisc ... tbf``: netem does not exist on these kernels), then runs 4 gloo ranks inside it,
all on 127.0.0.1: no other address is ever used, and the namespace is deleted on exit, also on error. In one run of
the 4 processes it times every configuration of a suite on torchvision's ResNet-18 (11.7 M parameters, 32x32
inputs, batch 16 per rank), so the ratios compare like with like. Each configuration first takes ``tau`` untimed
steps (one whole outer iteration, with its outer step), then ``steps`` timed ones; the time is the slowest rank's,
from its first timed step to its last (no barrier at the start, which would wait for communication left in flight
by the warm-up: each window holds whole outer iterations of the steady state), and the bytes are those each rank
sends (the mean over the timed steps and the peak of one step).

- ``--suite algorithms`` (issue 5): compute only (no communication), AR-SGD, Local SGD (H = 12), SGP and OSGP, each
  without and with SlowMo (tau = 12). Targets: Local SGD + SlowMo >= 3x AR-SGD's iterations/s at 1 Gbit/s; OSGP
  within 1.1x of compute only; X + SlowMo >= 0.99x X.
- ``--suite beyond`` (issue 14): compute only, then Local SGD + SlowMo (tau = 12) as Algorithm 1, with streaming
  fragments (P = 4, d = 3), with the eager outer step, and with int8 or fp4 pseudo-gradients (error feedback). The outer
  communication's exposed time is (t - t_compute) per step; the fraction of plain SlowMo's removed is 1 - exposed /
  exposed_SlowMo: by overlap for streaming and eager (same total bytes), by fewer bytes for int8 and fp4. Goal: eager or
  streaming keeps >= 0.95x compute-only iterations/s at 1 Gbit/s, where plain SlowMo does not.

Writes ``results/emulated_network/``: ``emulated_network[_beyond].csv`` and ``.png``, and its ``README.md``.

    sudo .venv/bin/python benchmarks/emulated_network.py                                     # 1 and 10 Gbit/s, 10 min
    sudo .venv/bin/python benchmarks/emulated_network.py --suite beyond --rates 1gbit 100mbit  # about 15 minutes
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from slowmo.comm import spawn
from slowmo.train.config import Config

from common import config, optimizer, suite, timed_steps, with_and_without
from readme import record

TAU = 12  # the suites' tau: the warm-up is one outer iteration
SUITES = ("algorithms", "beyond")  # configs/benchmark/emulated_network[_beyond].yaml


def cells(name: str) -> dict[str, Config]:
    """The suite's configurations by name: compute only first, then the reference of the ratios."""
    spec = suite("emulated_network" if name == "algorithms" else f"emulated_network_{name}")
    return {label: config(spec["base"].split(), cell) for label, cell in spec["cells"].items()}


def _time_all(comm, suite: str, steps: int, batch: int) -> list[tuple[float, float, list[int]]]:
    """Every configuration of ``suite`` in turn on these ranks: (start, end, bytes sent per step) of each."""
    import torchvision

    results = []
    for cfg in cells(suite).values():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        opt = optimizer(comm, model, cfg)
        sent: list[int] = []
        start, end = timed_steps(comm, model, opt, batch, steps, warmup=TAU, sent=sent, sync_start=False)
        results.append((start, end, sent))
    return results


def worker(args: argparse.Namespace) -> None:
    """Inside the namespace: 4 gloo ranks on 127.0.0.1; prints one CSV line per configuration."""
    ranks = spawn(_time_all, 4, "gloo", args=(args.suite, args.steps, args.batch), timeout=600)
    for i, label in enumerate(cells(args.suite)):
        seconds = max(rank[i][1] - rank[i][0] for rank in ranks)  # the slowest rank's steady-state window
        sent = [sum(rank[i][2][k] for rank in ranks) / len(ranks) for k in range(args.steps)]
        print(f"ROW;{label};{args.steps / seconds};{sum(sent) / args.steps};{max(sent)}", flush=True)


def shaped_run(rate: str, args: argparse.Namespace) -> list[dict]:
    namespace = f"slowmo-bench-{os.getpid()}"
    rate_bits = {"gbit": 10**9, "mbit": 10**6}[rate[-4:]] * float(rate[:-4])
    burst = max(int(rate_bits / 8 / 100), 64 * 1024)  # 10 ms worth of bytes
    try:
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        inside = ["ip", "netns", "exec", namespace]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [
                *inside,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                "100ms",
            ],
            check=True,
        )
        command = [sys.executable, __file__, "--worker", "--suite", args.suite]
        out = subprocess.run(
            [*inside, *command, "--steps", str(args.steps), "--batch", str(args.batch)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    rows = []
    for line in out.splitlines():
        if line.startswith("ROW;"):
            _, label, its, mean_bytes, peak_bytes = line.split(";")
            rows.append(
                {
                    "rate": rate,
                    "config": label,
                    "its_per_s": float(its),
                    "mean_bytes_per_step": round(float(mean_bytes)),
                    "peak_bytes_per_step": round(float(peak_bytes)),
                }
            )
    by = {r["config"]: r for r in rows}
    named = cells(args.suite)
    compute, first = list(named)[:2]  # compute only, and the reference of the ratios
    for r in rows:
        r["vs_compute_only"] = r["its_per_s"] / by[compute]["its_per_s"]
        r["exposed_comm_s_per_step"] = 1 / r["its_per_s"] - 1 / by[compute]["its_per_s"]
    without = dict(with_and_without(named))
    for r in rows:
        if args.suite == "algorithms":
            r[f"vs {first}"] = r["its_per_s"] / by[first]["its_per_s"]
            r["vs_without_slowmo"] = (
                r["its_per_s"] / by[without[r["config"]]]["its_per_s"] if r["config"] in without else ""
            )
        else:
            removed = r["config"] not in (compute, first)
            plain = by[first]["exposed_comm_s_per_step"]
            r["comm_removed_vs_slowmo"] = 1 - r["exposed_comm_s_per_step"] / plain if removed else ""
    return rows


def bar_chart(rows: list[dict], suite: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    labels = list(cells(suite))
    fig, ax = plt.subplots(figsize=(11 if suite == "algorithms" else 8, 4))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        values = [next(r["its_per_s"] for r in rows if r["rate"] == rate and r["config"] == c) for c in labels]
        ax.bar([k + i * width for k in range(len(labels))], values, width, label=rate.replace("bit", "bit/s"))
    ax.set_xticks([k + width * (len(rates) - 1) / 2 for k in range(len(labels))], labels, rotation=20, ha="right")
    ax.set(ylabel="iterations / s", title="4 gloo ranks on a shaped loopback, ResNet-18 (11.7 M), batch 16 per rank")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="algorithms")
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--steps", type=int, default=24, help="timed steps (a multiple of tau = 12)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("results/emulated_network"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        sys.exit("error: creating a network namespace needs root; run with sudo")
    rows = []
    for rate in args.rates:
        rows += shaped_run(rate, args)
        for r in rows[-len(cells(args.suite)) :]:
            print(
                f"{rate:>7} {r['config']:>20} {r['its_per_s']:7.2f} it/s  x{r['vs_compute_only']:.2f} compute  "
                f"{r['mean_bytes_per_step'] / 2**20:8.2f} MiB/step (peak {r['peak_bytes_per_step'] / 2**20:.2f})",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "emulated_network" if args.suite == "algorithms" else f"emulated_network_{args.suite}"
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bar_chart(rows, args.suite, args.out / f"{name}.png")
    print(f"wrote {args.out}/{name}.csv and {name}.png")
    record(args.out, __file__, argv, key=args.suite)


if __name__ == "__main__":
    main()
