"""Bytes each rank sends per algorithm, counted by the communicator, against the formulas."""

import pytest

import slowmo

from problems import Setup, run_engine

N, STEPS = 4, 12
THETA_BYTES = (5 + 1) * 8  # |theta| = 6 float64 values
BROADCAST = {r: 0 if r == N - 1 else THETA_BYTES for r in range(N)}  # the start-up broadcast from rank 0


def ring(nbytes, n=N):
    return 2 * (n - 1) * nbytes // n


CASES = [  # (setup, bytes per rank over STEPS inner steps, excluding the start-up broadcast)
    (Setup("allreduce"), {"all_reduce": STEPS * ring(THETA_BYTES)}),
    (Setup("localsgd", period=3), {"all_reduce": STEPS // 3 * ring(THETA_BYTES)}),
    (Setup("localsgd"), {}),
    (Setup("sgp"), {"send": STEPS * (THETA_BYTES + 8)}),  # |theta| + 1 values per step
    (Setup("osgp"), {"send": STEPS * (THETA_BYTES + 8)}),
    (Setup("localsgd", outer=dict(tau=4)), {"all_reduce": STEPS // 4 * ring(THETA_BYTES)}),
    (
        Setup("localsgd", period=2, outer=dict(tau=4)),  # the Local SGD average at an outer step is skipped
        {"all_reduce": (STEPS // 2) * ring(THETA_BYTES)},
    ),
    (  # no gossip round at an outer step: the exact average overwrites it
        Setup("sgp", outer=dict(tau=4)),
        {"send": (STEPS - STEPS // 4) * (THETA_BYTES + 8), "all_reduce": 3 * ring(THETA_BYTES)},
    ),
    (  # AllReduce keeps the replicas equal: no exact average at an outer step
        Setup("allreduce", outer=dict(tau=6)),
        {"all_reduce": STEPS * ring(THETA_BYTES)},
    ),
    # sharded: reduce-scatter + all-gather of the flat parameters padded to 8 values (a multiple of 4 ranks)
    (
        Setup("localsgd", outer=dict(tau=4, mean=dict(name="sharded"))),
        {"reduce_scatter": 3 * (3 * 64 // 4), "all_gather": 3 * (3 * 64 // 4)},
    ),
    # compressed outer average (slowmo/compress.py): 6 values padded to 8, shards of L = 2; each outer step sends
    # (n - 1) S(L) in the all-to-all and in the all-gather, S(2) = 2 int8 codes + one float32 scale, or 2 fp16 values
    (
        Setup("localsgd", outer=dict(tau=4, mean=dict(name="compressed", codec="int8", error_feedback=True))),
        {"all_to_all": 3 * 3 * (2 + 4), "all_gather": 3 * 3 * (2 + 4)},
    ),
    (
        Setup("sgp", outer=dict(tau=4, mean=dict(name="compressed", codec="fp16"))),
        {"send": (STEPS - STEPS // 4) * (THETA_BYTES + 8), "all_to_all": 3 * 3 * 4, "all_gather": 3 * 3 * 4},
    ),
]


@pytest.mark.parametrize("setup,expected", CASES, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_bytes_per_rank_equal_the_formula(setup, expected):
    res = slowmo.comm.spawn(run_engine, N, "simulated", args=(setup,))
    for rank, r in enumerate(res):
        stats = dict(r["stats"])
        assert stats.pop("broadcast") == BROADCAST[rank]
        total = stats.pop("total")
        assert stats == expected
        assert total == sum(expected.values()) + BROADCAST[rank]


def test_sharded_and_unsharded_outer_steps_send_the_same_bytes_when_no_padding_is_needed():
    def outer_bytes(shard):
        s = Setup(
            "localsgd", d=7, outer=dict(tau=4, mean=dict(name="sharded" if shard else "exact"))
        )  # 8 values: no padding
        stats = slowmo.comm.spawn(run_engine, N, "simulated", args=(s,))[0]["stats"]
        return stats["total"] - stats["broadcast"]

    assert outer_bytes(True) == outer_bytes(False) == 3 * ring(64)


def test_hierarchical_gossip_sends_inside_and_across_nodes():
    s = Setup("sgp", world_size=8, procs_per_node=2)
    stats = slowmo.comm.spawn(run_engine, 8, "simulated", args=(s,))[0]["stats"]
    assert stats["node/all_reduce"] == STEPS * ring(THETA_BYTES, 2)  # gradient mean inside the node
    assert stats["cross/send"] == STEPS * (THETA_BYTES + 8)  # gossip with one other node
