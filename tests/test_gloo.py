"""Real processes over gloo on 127.0.0.1: the same numbers as the simulator, and no hang when a rank dies."""

import time

import numpy as np
import pytest

import slowmo

from problems import Setup, run_engine

SETUPS = [
    Setup("allreduce", momentum=0.9),
    Setup("allreduce", slowmo=dict(tau=3, beta=0.5)),
    Setup("localsgd", period=3),
    Setup("localsgd", slowmo=dict(tau=4, beta=0.6), momentum=0.9, nesterov=True, decay_at=6),
    Setup("sgp"),
    Setup("sgp", slowmo=dict(tau=4, beta=0.5, base_buffers="average"), momentum=0.9),
    Setup("osgp"),
    Setup("osgp", slowmo=dict(tau=4, beta=0.5, nesterov=True, shard_outer_state=True)),
    Setup("sgp", procs_per_node=2, slowmo=dict(tau=4, beta=0.5)),
    Setup(  # the compressed average (all-to-all, all-gather of int8 codes) with outer Adam
        "localsgd",
        slowmo=dict(tau=4, beta=0.5, alpha=0.3, outer_optimizer="adam", compression="int8", error_feedback=True),
        d=40,
    ),
    Setup("sgp", slowmo=dict(tau=4, beta=0.6, outer_optimizer="nesterov", compression="fp8", clip_norm=0.05), d=40),
    Setup("osgp", slowmo=dict(tau=4, beta=0.5, eager=True), momentum=0.9),  # the all-reduce in flight for real
    Setup("localsgd", slowmo=dict(tau=4, beta=0.5, fragments=2, sync_delay=2, fragment_mix=0.5), momentum=0.9),
]


def _run_all(comm, setups):
    return [run_engine(comm, s) for s in setups]


@pytest.fixture(scope="module")
def both():
    sim = slowmo.comm.spawn(_run_all, 4, "simulated", args=(SETUPS,))
    gloo = slowmo.comm.spawn(_run_all, 4, "gloo", args=(SETUPS,), timeout=60)
    return sim, gloo


@pytest.mark.parametrize("index", range(len(SETUPS)), ids=[f"{s.algorithm}-{s.slowmo}" for s in SETUPS])
def test_gloo_equals_simulated(both, index):
    sim, gloo = both
    for rank in range(4):
        a, b = sim[rank][index], gloo[rank][index]
        assert np.allclose(b["theta"], a["theta"], rtol=1e-6, atol=0)
        assert b["stats"] == a["stats"]


def _one_rank_dies(comm, what):
    if comm.rank == 2:
        return "gone"
    import torch

    if what == "collective":
        comm.all_reduce(torch.ones(4))
    else:
        comm.recv(torch.empty(4), src=2)


@pytest.mark.parametrize("what", ["collective", "gossip receive"])
def test_a_dead_rank_makes_the_others_fail_within_the_timeout(what):
    start = time.time()
    with pytest.raises(RuntimeError, match="ranks failed") as info:
        slowmo.comm.spawn(_one_rank_dies, 3, "gloo", args=(what,), timeout=3)
    assert "CommError" in str(info.value)
    assert time.time() - start < 60
