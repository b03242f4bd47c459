"""The simulated communicator against plain NumPy, its byte accounting, groups, and failing fast."""

import time

import numpy as np
import pytest
import torch

import slowmo
from slowmo.comm import CommError


def _collectives(comm):
    r, n = comm.rank, comm.world_size
    base = torch.arange(8, dtype=torch.float64) * (r + 1)
    out = {}
    out["sum"] = comm.all_reduce(base.clone()).numpy()
    out["mean"] = comm.all_reduce(base.clone(), "mean").numpy()
    out["rs"] = comm.reduce_scatter(torch.empty(8 // n, dtype=torch.float64), base.clone()).numpy()
    out["ag"] = comm.all_gather(
        torch.empty(2 * n, dtype=torch.float64), torch.full((2,), float(r), dtype=torch.float64)
    ).numpy()
    out["bc"] = comm.broadcast(torch.full((3,), float(r)), src=2).numpy()
    msg = torch.full((5,), 10.0 + r)
    send = comm.isend(msg, (r + 1) % n)
    got = torch.empty(5)
    comm.irecv(got, (r - 1) % n).wait()
    send.wait()
    out["p2p"] = got.numpy()
    comm.barrier()
    out["stats"] = comm.stats()
    return out


def test_collectives_match_numpy():
    n = 4
    res = slowmo.comm.spawn(_collectives, n, "simulated")
    parts = np.stack([np.arange(8.0) * (r + 1) for r in range(n)])
    for r, out in enumerate(res):
        assert np.array_equal(out["sum"], parts.sum(0))
        assert np.allclose(out["mean"], parts.mean(0))
        assert np.array_equal(out["rs"], parts.sum(0)[2 * r : 2 * r + 2])
        assert np.array_equal(out["ag"], np.repeat(np.arange(n, dtype=float), 2))
        assert np.array_equal(out["bc"], np.full(3, 2.0))
        assert np.array_equal(out["p2p"], np.full(5, 10.0 + (r - 1) % n))


def test_bytes_follow_the_ring_formulas():
    n = 4
    res = slowmo.comm.spawn(_collectives, n, "simulated")
    for r, out in enumerate(res):
        s = out["stats"]
        assert s["all_reduce"] == 2 * (2 * (n - 1) * 64 // n)  # two all-reduces of 8 float64
        assert s["reduce_scatter"] == (n - 1) * 64 // n
        assert s["all_gather"] == (n - 1) * (2 * n * 8) // n
        assert s["broadcast"] == (0 if r == 1 else 12)  # chain from rank 2: rank 1 is last
        assert s["send"] == 20
        assert s["total"] == sum(v for k, v in s.items() if k != "total")
    assert sum(out["stats"]["broadcast"] for out in res) == (n - 1) * 12


def _groups(comm):
    node, cross = comm.split_nodes(2)
    t = torch.tensor([float(comm.rank)])
    node.all_reduce(t)
    u = torch.tensor([float(comm.rank)])
    cross.all_reduce(u)
    return node.rank, node.world_size, t.item(), cross.rank, cross.world_size, u.item(), comm.stats()


def test_node_and_cross_groups():
    res = slowmo.comm.spawn(_groups, 6, "simulated")
    for r, (nr, nn, t, cr, cn, u, stats) in enumerate(res):
        node = r // 2
        assert (nr, nn, t) == (r % 2, 2, float(2 * node + 2 * node + 1))
        assert (cr, cn, u) == (node, 3, float(sum(3 * [r % 2]) + sum(2 * i for i in range(3))))
        assert stats["node/all_reduce"] == 2 * 1 * 4 // 2 and stats["cross/all_reduce"] == 2 * 2 * 4 // 3


def test_split_nodes_rejects_an_uneven_split():
    with pytest.raises(ValueError, match="not divisible by procs_per_node=4"):
        slowmo.comm.spawn(lambda comm: comm.split_nodes(4), 6)


def _one_rank_skips(comm):
    if comm.rank == 3:
        return "left"
    comm.all_reduce(torch.ones(3))


def test_a_missing_rank_times_out_with_a_clear_error():
    start = time.time()
    with pytest.raises(CommError, match="all_reduce #0 timed out after 0.5s"):
        slowmo.comm.spawn(_one_rank_skips, 4, "simulated", timeout=0.5)
    assert time.time() - start < 5


def _one_rank_crashes(comm):
    if comm.rank == 1:
        raise ZeroDivisionError("boom")
    comm.barrier()


def test_a_crashing_rank_aborts_the_others_and_its_error_is_raised():
    start = time.time()
    with pytest.raises(ZeroDivisionError, match="boom"):
        slowmo.comm.spawn(_one_rank_crashes, 4, "simulated", timeout=60)
    assert time.time() - start < 5


def _mismatched(comm):
    if comm.rank == 0:
        comm.barrier()
    else:
        comm.all_reduce(torch.ones(1))


def test_mismatched_collectives_are_reported():
    with pytest.raises(CommError, match="every rank must issue the same collectives"):
        slowmo.comm.spawn(_mismatched, 2, "simulated", timeout=5)


def _random(comm):
    torch.manual_seed(comm.rank)
    first = torch.rand(3)
    comm.barrier()
    return torch.cat([first, torch.rand(3)])


def test_each_simulated_rank_has_its_own_random_stream():
    res = slowmo.comm.spawn(_random, 3, "simulated")
    for r, got in enumerate(res):
        torch.manual_seed(r)
        assert torch.equal(got, torch.rand(6))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'mpi'; choose one of simulated, gloo, nccl"):
        slowmo.comm.spawn(_random, 2, "mpi")
