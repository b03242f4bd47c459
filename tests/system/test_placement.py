"""Where things run: every tensor of a run on ``dist.device``, CPU threads that fit the node, node groups that are
real hosts."""

import os

import pytest
import torch

from slowmo import launch
from slowmo.comm import free_port, spawn
from slowmo.train import loop, run, validate
from slowmo.train.data import _tensors

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine (scripts/gpu_check.sh runs these where there is one)",
)


def _where_everything_is(comm, config, run_dir):
    """One rank of a run that records the device of every tensor it can reach at inner step 5."""
    trainer = loop._Trainer(comm, config, run_dir, None)
    seen: dict[str, set] = {}

    def note(kind, tensors):
        seen.setdefault(kind, set()).update(str(t.device) for t in tensors)

    task_loss, task_eval = trainer.task.loss, trainer.task.eval_sums
    calls = iter(range(10**6))

    def loss(net, batch):
        note("batch", _tensors(batch))
        out = task_loss(net, batch)
        note("loss", [out])
        if next(calls) == 5:
            opt = trainer.opt
            note("parameters", trainer.model.parameters())
            note("buffers", trainer.model.buffers())
            note("eval model", trainer.evaluator.model.parameters())
            note(
                "base optimizer state",
                [
                    v
                    for s in opt.base_optimizer.state.values()
                    for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0
                ],
            )
            note("push-sum weight", [opt.algorithm.weight])
            note("in-flight messages", [buf for buf, _ in opt.algorithm._in_flight[2]])
            note("slow momentum u and x_{t,0}", [opt.update.v, opt.update.x0])
        return out

    def eval_sums(net, batch):
        note("eval batch", _tensors(batch))
        out = task_eval(net, batch)
        note("eval sums", [out])
        return out

    trainer.task.loss, trainer.task.eval_sums = loss, eval_sums
    trainer.train()
    return {kind: sorted(devices) for kind, devices in seen.items()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("backend", ["gloo", "simulated"])
def test_every_tensor_of_a_run_is_on_dist_device(tmp_path, device, backend):
    config = validate(
        {
            "run_dir": str(tmp_path),
            "dist": {"backend": backend, "device": device},
            "model": {"name": "cnn", "width": 8},
            "algorithm": {"name": "osgp"},
            "slowmo": {"enabled": True, "tau": 4, "update": {"beta": 0.5}},
            "data": {"batch_size": 8},
            "logger": {"progress": False},
            "train": {"max_steps": 8, "eval_every": 4},
        }
    )
    world = 2 if backend == "gloo" else 4
    results = spawn(_where_everything_is, world, backend, args=(config, tmp_path), timeout=60)
    for rank, seen in enumerate(results):
        assert len(seen) == 11, seen
        expected = [device] if device == "cpu" else [f"cuda:{rank % torch.cuda.device_count()}"]
        assert all(devices == expected for devices in seen.values()), (rank, seen)


# ------------------------------------------------------------------------------------------------ threads
def test_threads_per_rank_follow_the_launcher():
    assert launch.threads_per_rank({"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "5"}, 4, cores=16) == 3
    assert launch.threads_per_rank({"SLURM_CPUS_PER_TASK": "5"}, 4, cores=16) == 5
    assert launch.threads_per_rank({}, 4, cores=16) == 4  # the node's cores shared by its ranks
    assert launch.threads_per_rank({}, 4, cores=2) == 1
    assert launch.threads_per_rank({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}, 2, cores=8) == 4


def test_a_launched_rank_sets_its_threads(tmp_path, monkeypatch):
    """A rank of a job (here a one-process torchrun world) takes its thread count from the launcher's variables."""
    for key, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        SLURM_CPUS_PER_TASK="1",
    ).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run(
            {
                "run_dir": str(tmp_path),
                "dist": {"backend": "gloo"},
                "logger": {"progress": False},
                "train": {"max_steps": 2, "eval_every": 0},
            }
        )
    finally:
        torch.set_num_threads(before)
    assert summary["threads"] == 1


# ------------------------------------------------------------------------------------------------ hosts
def _check_hosts(comm):
    """4 ranks on 2 hosts: srun's block placement puts ranks 0-1 on node0; -m cyclic puts ranks 0 and 2 there."""
    outcomes = []
    for placement, procs_per_node in (("block", 2), ("cyclic", 2), ("cyclic", 1)):
        host = f"node{comm.rank % 2}" if placement == "cyclic" else f"node{comm.rank // 2}"
        try:
            launch.check_node_groups(comm, procs_per_node, torch.device("cpu"), host=host)
            outcomes.append(None)
        except ValueError as error:
            outcomes.append(str(error))
    return outcomes


def test_a_node_group_that_spans_hosts_is_refused():
    refused = (
        "algorithm.procs_per_node=2 makes ranks 0-1 one node, but they run on hosts node0, node1; place "
        "consecutive ranks on one host (srun's default block distribution, not -m cyclic) or lower "
        "algorithm.procs_per_node"
    )
    # block placement passes; cyclic is refused on every rank; single-rank nodes span nothing
    assert spawn(_check_hosts, 4, "gloo") == [[None, refused, None]] * 4


def test_threads_of_spawned_ranks_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert spawn(_threads, 2, "gloo") == [max(1, cores // 2)] * 2


def _threads(comm):
    return torch.get_num_threads()
