"""Where this process sits in the job: rank, world size, local rank and rendezvous address.

Read from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or from SLURM's
``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the step's node list), so a job needs
no hand-set environment; with neither, the process is a single rank. Also what follows from the place: the
rank's device (:func:`resolve_device`), its CPU threads (:func:`threads_per_rank`) and the check that a node of the
algorithm's hierarchy is one host (:func:`check_node_groups`).
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import CommError, Communicator
from .torch_distributed import TorchDistributed, reason


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world and rendezvous of this process, from torchrun's or SLURM's environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_STEP_NUM_TASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            _first_count(env.get("SLURM_STEP_TASKS_PER_NODE", "1")),
            env.get("MASTER_ADDR") or first_host(nodelist),
            int(port),
            "slurm",
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[003-010,012],cpu1`` (``scontrol`` when available)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.fullmatch(r"(.*)\[([^\]-,]+).*\]", head)
    return match.group(1) + match.group(2) if match else head


def _first_count(tasks_per_node: str) -> int:
    """``SLURM_STEP_TASKS_PER_NODE`` looks like ``8(x4)`` or ``2,1``: the count on the first node."""
    return int(re.match(r"\d+", tasks_per_node).group(0))


def init_distributed(backend: str = "gloo", timeout_s: float = 300.0, env: DistEnv | None = None) -> TorchDistributed:
    """Create the world process group from the environment and return its communicator.

    ``backend`` is "gloo" (CPU tensors) or "nccl" (one GPU per process, chosen by the local rank).
    """
    env = env or detect()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("dist.backend=nccl needs CUDA GPUs, and none is visible; use dist.backend=gloo on CPU")
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {env.local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                "start at most one process per GPU (procs per node <= GPUs per node)"
            )
        torch.cuda.set_device(env.local_rank)
    elif backend != "gloo":
        raise ValueError(f"unknown torch.distributed backend {backend!r}; use gloo (CPU) or nccl (GPU)")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    if env.rank == 0 and not agent_store:
        check_port_free(env.master_addr, env.master_port)  # rank 0 hosts it
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            env.master_addr, env.master_port, env.world_size, env.rank == 0 and not agent_store, timeout
        )
        # a restart by torchrun (--max-restarts) meets in the same store: keys of a dead attempt must not be read
        store = dist.PrefixStore(f"slowmo/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise CommError(
            f"rank {env.rank}: cannot join the process group at {env.master_addr}:{env.master_port} "
            f"({reason(error)}); is the master unreachable or a peer missing?"
        ) from error
    return TorchDistributed(timeout=timeout_s)


def check_port_free(host: str, port: int) -> None:
    """Raise when something listens on ``port``. Bound as torch's TCPStore binds it (SO_REUSEADDR), so that a port
    left in TIME_WAIT by a preempted attempt of the same job is free, as it is to the store."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"port {port} on {host} is already in use, and rank 0 must host the rendezvous "
                    "there; set MASTER_PORT to a free port"
                ) from None


def check_placement(procs_per_node: int, backend: str, local_world_size: int, gpus: int | None = None) -> None:
    """A node of the algorithm's hierarchy is a real machine: its processes run on one node and, under NCCL,
    each has a GPU of its own. Raises ValueError (one line) otherwise."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    wanted = max(procs_per_node, local_world_size)
    if backend == "nccl" and wanted > gpus:
        raise ValueError(
            f"{wanted} processes per node need {wanted} GPUs, this node has {gpus}; lower "
            "algorithm.procs_per_node (and the processes started per node) to at most the GPUs per node"
        )
    if procs_per_node > local_world_size:
        raise ValueError(
            f"algorithm.procs_per_node={procs_per_node} is larger than the {local_world_size} processes "
            f"started on this node; set it to at most {local_world_size}"
        )


def resolve_device(choice: str, backend: str, local_rank: int = 0) -> torch.device:
    """The device this rank computes on, from ``dist.device``.

    ``auto``: the local GPU under NCCL, the CPU otherwise. ``cuda``: a GPU under every backend; ranks that share a
    node's GPUs (gloo processes, simulated ranks) take GPU ``local_rank mod #GPUs``, which is how one GPU tests the
    multi-rank GPU path. ``cpu``: the CPU (the config refuses it with NCCL, which moves only GPU tensors). Raises
    ValueError (one line) when no GPU is visible for ``cuda``.
    """
    wanted = ("cuda" if backend == "nccl" else "cpu") if choice == "auto" else choice
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"dist.device={choice} needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
            f"False); use dist.device=cpu{' with dist.backend=gloo' if backend == 'nccl' else ''}"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def place(choice: str, backend: str, local_rank: int, deterministic: bool) -> torch.device:
    """This rank's device (:func:`resolve_device`) and, on a GPU, its kernel settings: cuDNN's autotuner, or
    deterministic kernels (``train.deterministic``, where torch has them; a warning where it has none)."""
    device = resolve_device(choice, backend, local_rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic  # the fastest kernels, found on the first batches
        torch.backends.cudnn.deterministic = deterministic
    return device


def threads_per_rank(
    environ: Mapping[str, str] | None = None, local_world_size: int = 1, cores: int | None = None
) -> int:
    """CPU threads for one rank, as torchrun decides them: ``OMP_NUM_THREADS`` when set, else SLURM's
    ``SLURM_CPUS_PER_TASK``, else this process's cores divided by the ranks on the node (torch's default, every
    core in every rank, oversubscribes a node that runs several ranks)."""
    env = os.environ if environ is None else environ
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, local_world_size))


def check_node_groups(comm: Communicator, procs_per_node: int, device: torch.device, host: str | None = None) -> None:
    """A node of the algorithm's hierarchy (``procs_per_node`` consecutive ranks) must be one host: one all-gather of
    the host names (not counted as training traffic). Raises ValueError (one line) when a node group spans hosts,
    e.g. under ``srun -m cyclic``."""
    name = (host or socket.gethostname()).encode()[:255]
    mine = torch.zeros(256, dtype=torch.uint8)
    mine[0], mine[1 : 1 + len(name)] = len(name), torch.tensor(list(name), dtype=torch.uint8)
    everyone = torch.empty(256 * comm.world_size, dtype=torch.uint8, device=device)
    with comm.uncounted():
        comm.all_gather(everyone, mine.to(device))
    rows = everyone.view(comm.world_size, 256).cpu().tolist()
    hosts = [bytes(row[1 : 1 + row[0]]).decode(errors="replace") for row in rows]
    for first in range(0, comm.world_size, procs_per_node):
        group = hosts[first : first + procs_per_node]
        if len(set(group)) > 1:
            raise ValueError(
                f"algorithm.procs_per_node={procs_per_node} makes ranks {first}-{first + len(group) - 1} "
                f"one node, but they run on hosts {', '.join(sorted(set(group)))}; place consecutive "
                "ranks on one host (srun's default block distribution, not -m cyclic) or lower "
                "algorithm.procs_per_node"
            )
