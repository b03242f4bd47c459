"""Every algorithm, with and without SlowMo, against the plain-NumPy reference in problems.py (4+ ranks)."""

import numpy as np
import pytest
import torch

import slowmo
from slowmo.comm import Single

from problems import Setup, Uneven, reference, run_engine

CASES = {
    "localsgd_H3": Setup("localsgd", period=3),
    "localsgd+slowmo_nesterov_sgd_lr_decay": Setup(
        "localsgd", outer=dict(tau=4, update=dict(beta=0.6)), momentum=0.9, nesterov=True, decay_at=6
    ),
    "localsgd_H2+slowmo_tau4": Setup("localsgd", period=2, outer=dict(tau=4, update=dict(beta=0.7)), steps=13),
    "allreduce": Setup("allreduce", momentum=0.9),
    "allreduce+slowmo": Setup("allreduce", outer=dict(tau=3, update=dict(beta=0.5))),
    "sgp": Setup("sgp"),
    "sgp+slowmo": Setup("sgp", outer=dict(tau=4, update=dict(beta=0.5)), decay_at=5),
    "osgp": Setup("osgp"),
    "osgp+slowmo": Setup("osgp", outer=dict(tau=4, update=dict(beta=0.5)), momentum=0.9),
    "osgp+slowmo_outer_nesterov": Setup("osgp", outer=dict(tau=4, update=dict(beta=0.5, nesterov=True))),
    "sgp_8ranks_4nodes": Setup("sgp", world_size=8, procs_per_node=2, outer=dict(tau=5, update=dict(beta=0.3))),
    "osgp_6ranks_non_power_of_2": Setup("osgp", world_size=6, outer=dict(tau=5, update=dict(beta=0.3))),
    "sgp_uneven_graph": Setup("sgp", world_size=5, graph=Uneven, momentum=0.9),
    "osgp_uneven_graph+slowmo": Setup(
        "osgp", world_size=5, graph=Uneven, outer=dict(tau=5, update=dict(beta=0.5)), steps=13
    ),
    "localsgd_slow_lr_0.5": Setup("localsgd", outer=dict(tau=3, update=dict(alpha=0.5, beta=0.4))),
    "raw_pseudo_gradient": Setup(
        "localsgd", outer=dict(tau=4, update=dict(alpha=0.8, beta=0.4, pseudo_gradient="raw")), decay_at=5
    ),
}
for policy in ("keep", "reset", "average"):
    CASES[f"base_buffers_{policy}"] = Setup(
        "localsgd", outer=dict(tau=4, base_buffers=policy, update=dict(beta=0.5)), momentum=0.9, nesterov=True
    )
for name in ("localsgd", "sgp", "osgp"):
    CASES[f"{name}+slowmo_sharded"] = Setup(
        name, outer=dict(tau=4, update=dict(beta=0.6), mean=dict(name="sharded")), decay_at=7, momentum=0.9
    )


def engine(s: Setup, with_history: bool = False) -> np.ndarray | list[dict]:
    ranks = slowmo.comm.spawn(run_engine, s.world_size, "simulated", args=(s, with_history))
    return ranks if with_history else np.stack([r["theta"] for r in ranks])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name):
    s = CASES[name]
    got, want = engine(s), reference(s)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12), np.abs(got - want).max()
    assert not np.allclose(want, reference(s.with_(steps=s.steps - 1)))  # the last step changed something


@pytest.mark.parametrize("name", ["osgp", "sgp_uneven_graph", "osgp_uneven_graph+slowmo"])
def test_push_sum_weights_leave_1_where_stepping_x_and_z_differ(name):
    """Where every w stays 1 (SGP on the exponential graph) the step on x and on z are the same rule; these cases
    are the ones that tell the paper's rule (the step on x, in the reference) from the other."""
    weights = [w for rank in engine(CASES[name], with_history=True) for _, w in rank["history"]]
    assert max(abs(w - 1.0) for w in weights) > 0.1


def test_slow_momentum_changes_the_trajectory():
    s = Setup("localsgd", outer=dict(tau=4, update=dict(beta=0.6)))
    assert not np.allclose(engine(s), engine(s.with_(outer=dict(tau=4, update=dict(beta=0.0)))), atol=1e-6)


@pytest.mark.parametrize("name", ["localsgd", "sgp", "osgp"])
def test_sharded_equals_unsharded(name):
    s = Setup(
        name, outer=dict(tau=3, update=dict(beta=0.7, nesterov=True)), momentum=0.9, steps=10, d=9
    )  # 10 values on 4 ranks
    sharded = s.with_(outer=dict(s.outer, mean=dict(name="sharded")))
    assert np.array_equal(engine(s), engine(sharded))


def test_every_rank_holds_the_same_model_after_an_outer_step():
    got = engine(Setup("osgp", outer=dict(tau=4, update=dict(beta=0.5)), steps=8))
    assert np.array_equal(got, np.tile(got[0], (4, 1)))


def _displacement_per_round(base_buffers: str, beta: float | None, rounds: int = 60, tau: int = 12) -> float:
    """On f(x) = x (a constant gradient 1), lr 1, SGD with Nesterov momentum 0.9: how far x moves in the last round of
    tau inner steps (``beta`` None: no SlowMo, the momentum kept), once the rounds have settled."""
    x = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    base = torch.optim.SGD([x], lr=1.0, momentum=0.9, nesterov=True)
    if beta is None:
        opt = slowmo.DistributedOptimizer([x], base, slowmo.LocalSGD(Single()))
    else:
        update = slowmo.SlowMomentum(alpha=1.0, beta=beta)
        opt = slowmo.SlowMo([x], base, slowmo.LocalSGD(Single()), tau=tau, update=update, base_buffers=base_buffers)
    for _ in range(rounds - 1):
        for _ in range(tau):
            x.grad = torch.ones(1, dtype=torch.float64)
            opt.step()
    start = x.item()
    for _ in range(tau):
        x.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    return start - x.item()


def test_zeroing_nesterov_buffers_every_12_steps_halves_a_rounds_step_and_beta_half_gives_it_back():
    """The README's step-size arithmetic. Nesterov SGD from zeroed buffers moves sum_k (1 + mu (1 - mu^(k+1)) /
    (1 - mu)) = 61.88 lrs in 12 steps, against 12 / (1 - mu) = 120 with its momentum kept: 0.516 of it. SlowMo's
    steady outer step is the round's displacement / (1 - beta) (alpha = 1), so buffers zeroed and beta = 0.5 move
    123.8: about the base's own step with its momentum kept, not alpha / (1 - beta) = 2 times it."""
    mu, tau = 0.9, 12
    zeroed = sum(1 + mu * (1 - mu ** (k + 1)) / (1 - mu) for k in range(tau))
    assert zeroed == pytest.approx(61.88, abs=0.01) and zeroed / (tau / (1 - mu)) == pytest.approx(0.516, abs=0.001)
    assert _displacement_per_round("keep", None) == pytest.approx(tau / (1 - mu), rel=1e-9)
    assert _displacement_per_round("reset", 0.0) == pytest.approx(zeroed, rel=1e-12)
    assert _displacement_per_round("reset", 0.5) == pytest.approx(zeroed / 0.5, rel=1e-9)
    assert _displacement_per_round("keep", 0.5) == pytest.approx(tau / (1 - mu) / 0.5, rel=1e-9)
