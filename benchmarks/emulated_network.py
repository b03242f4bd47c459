"""Iterations/s of each algorithm, with and without SlowMo, over an emulated network.

The script creates a network namespace (``ip netns add``; root needed), brings its loopback up and shapes it with
a token bucket (``tc qdisc ... tbf``: netem does not exist on these kernels), then runs 4 gloo ranks inside it,
all on 127.0.0.1: no other address is ever used, and the namespace is deleted on exit, also on error. In one run of
the 4 processes it times every configuration on torchvision's ResNet-18 (11.7 M parameters, 32x32 inputs, batch
16 per rank), so the ratios compare like with like:

- compute only (no communication), AR-SGD, Local SGD (H = 12), SGP and OSGP, each without and with SlowMo
  (tau = 12).

Targets (issue 5): Local SGD + SlowMo >= 3x AR-SGD's iterations/s at 1 Gbit/s; OSGP within 1.1x of compute only;
X + SlowMo >= 0.99x X. Writes ``results/bench/emulated_network.csv`` and ``emulated_network.png``.

    sudo .venv/bin/python benchmarks/emulated_network.py              # 1 and 10 Gbit/s, about 10 minutes
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

from common import optimizer, timed_steps

CONFIGS = [
    ("compute", False),
    ("allreduce", False),
    ("allreduce", True),
    ("localsgd", False),
    ("localsgd", True),
    ("sgp", False),
    ("sgp", True),
    ("osgp", False),
    ("osgp", True),
]
TAU = 12


def _time_all(comm, steps: int, batch: int) -> list[float]:
    """Every configuration in turn on these ranks; returns the seconds of ``steps`` measured steps of each."""
    import torchvision

    results = []
    for algorithm, slowmo_on in CONFIGS:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        if algorithm == "compute":  # Local SGD that never averages: no communication at all
            opt = optimizer(comm, model, "localsgd", None, lr=0.01)
        else:
            opt = optimizer(
                comm, model, algorithm, TAU, lr=0.01, slowmo={"tau": TAU, "beta": 0.5} if slowmo_on else None
            )
        start, end = timed_steps(comm, model, opt, batch, steps, warmup=3)
        results.append(end - start)
    return results


def worker(args: argparse.Namespace) -> None:
    """Inside the namespace: 4 gloo ranks on 127.0.0.1; prints one CSV line per configuration."""
    seconds = spawn(_time_all, 4, "gloo", args=(args.steps, args.batch), timeout=600)[0]
    for (algorithm, slowmo_on), s in zip(CONFIGS, seconds, strict=True):
        print(f"ROW,{algorithm},{slowmo_on},{args.steps / s}", flush=True)


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
        out = subprocess.run(
            [*inside, sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    rows = []
    for line in out.splitlines():
        if line.startswith("ROW,"):
            _, algorithm, slowmo_on, its = line.split(",")
            rows.append({"rate": rate, "algorithm": algorithm, "slowmo": slowmo_on == "True", "its_per_s": float(its)})
    by = {(r["algorithm"], r["slowmo"]): r["its_per_s"] for r in rows}
    for r in rows:
        r["vs_ar_sgd"] = r["its_per_s"] / by[("allreduce", False)]
        r["vs_compute_only"] = r["its_per_s"] / by[("compute", False)]
        r["vs_without_slowmo"] = r["its_per_s"] / by[(r["algorithm"], False)] if r["slowmo"] else ""
    return rows


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    names = {"compute": "compute only", "allreduce": "AR-SGD", "localsgd": "Local SGD", "sgp": "SGP", "osgp": "OSGP"}
    labels = [names[a] + (" + SlowMo" if s else "") for a, s in CONFIGS]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        values = [
            next(r["its_per_s"] for r in rows if r["rate"] == rate and (r["algorithm"], r["slowmo"]) == c)
            for c in CONFIGS
        ]
        ax.bar([k + i * width for k in range(len(CONFIGS))], values, width, label=rate.replace("bit", "bit/s"))
    ax.set_xticks([k + width * (len(rates) - 1) / 2 for k in range(len(CONFIGS))], labels, rotation=20, ha="right")
    ax.set(ylabel="iterations / s", title="4 gloo ranks on a shaped loopback, ResNet-18 (11.7 M), batch 16 per rank")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        sys.exit("error: creating a network namespace needs root; run with sudo")
    rows = []
    for rate in args.rates:
        rows += shaped_run(rate, args)
        for r in rows[-len(CONFIGS) :]:
            print(
                f"{rate:>7} {r['algorithm']:>9}{' + SlowMo' if r['slowmo'] else '         '} "
                f"{r['its_per_s']:7.2f} it/s  x{r['vs_ar_sgd']:.2f} AR-SGD  x{r['vs_compute_only']:.2f} compute",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "emulated_network.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bar_chart(rows, args.out / "emulated_network.png")
    print(f"wrote {args.out}/emulated_network.csv and emulated_network.png")


if __name__ == "__main__":
    main()
