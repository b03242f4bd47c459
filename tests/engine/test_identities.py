"""Identities that the method promises: special cases, presets and conservation laws."""

import numpy as np
import pytest
import torch

import slowmo

from problems import Setup, build, lr_at, make_data, reference, run_clearing_grads, run_engine, train


def thetas(s: Setup, fn=run_engine) -> np.ndarray:
    return np.stack([r["theta"] for r in slowmo.comm.spawn(fn, s.world_size, "simulated", args=(s,))])


def test_alpha1_beta0_is_local_sgd_with_exact_average_every_tau():
    with_slowmo = Setup(
        "localsgd", outer=dict(tau=4, update=dict(alpha=1.0, beta=0.0)), momentum=0.9, decay_at=5, steps=14
    )
    local_sgd = with_slowmo.with_(outer=None, period=4)
    assert np.allclose(thetas(with_slowmo), thetas(local_sgd), rtol=0, atol=1e-13)


def _sgp_with_manual_exact_average(comm, s: Setup):
    data = make_data(s)
    model, opt = build(comm, s.with_(outer=None), data[2])
    for k in range(s.steps):
        train(model, opt, s, data, k, k + 1, comm)
        if (k + 1) % 4 == 0:
            opt.synchronize()
    return {"theta": model.theta()}


@pytest.mark.parametrize("name", ["sgp", "osgp"])
def test_alpha1_beta0_is_gossip_with_exact_average_every_tau(name):
    s = Setup(name, outer=dict(tau=4, update=dict(alpha=1.0, beta=0.0)), steps=13)
    assert np.allclose(thetas(s), thetas(s, _sgp_with_manual_exact_average), rtol=0, atol=1e-13)


def test_tau1_allreduce_is_single_process_sgd_on_the_union_of_the_data():
    s = Setup("allreduce", outer=dict(tau=1, update=dict(alpha=1.0, beta=0.0)), momentum=0.9, nesterov=True, decay_at=4)
    a, y, theta0 = make_data(s)
    x, c = torch.nn.Parameter(torch.tensor(theta0[:-1])), torch.nn.Parameter(torch.tensor(theta0[-1]))
    opt = torch.optim.SGD([{"params": [x]}, {"params": [c]}], lr=0.1, momentum=0.9, nesterov=True)
    for k in range(s.steps):  # one process, the 4 ranks' minibatches as one batch
        lr = lr_at(s, k)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr[0], lr[-1]
        ua, uy = torch.from_numpy(a[:, k].reshape(-1, s.d)), torch.from_numpy(y[:, k].reshape(-1))
        opt.zero_grad()
        (0.5 * (ua @ x + c - uy).pow(2).mean()).backward()
        opt.step()
    single = np.concatenate([x.detach().numpy(), [c.item()]])
    assert np.allclose(thetas(s), np.tile(single, (4, 1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["optimizer", "model", "none", "by hand"])
def test_the_gradient_mean_happens_however_the_gradients_were_cleared(how):
    s = Setup("allreduce", momentum=0.9, steps=6)
    ranks = slowmo.comm.spawn(run_clearing_grads, s.world_size, "simulated", args=(s, how))
    got = np.stack([r["theta"] for r in ranks])
    assert np.allclose(got, reference(s), rtol=1e-12, atol=1e-12), np.abs(got - reference(s)).max()


class Star(slowmo.GossipGraph):
    """Rank 0 sends to ranks 1 and 2, every other rank to rank 0: uneven in-degrees, so weights move."""

    def out_peers(self, rank, step):
        return [1, 2] if rank == 0 else [0]

    def in_peers(self, rank, step):
        return list(range(1, self.world_size)) if rank == 0 else [0] if rank in (1, 2) else []


def test_star_graph_is_column_stochastic():
    assert np.allclose(Star(5).mixing_matrix(0).sum(axis=0), 1.0)


@pytest.mark.parametrize("graph", [None, Star])
def test_push_sum_preserves_the_sums_of_x_and_w_at_every_step(graph):
    s = Setup(
        "sgp", world_size=5, steps=10, graph=graph
    )  # plain SGD, no momentum: z after the local step is z - lr * g
    per_rank = slowmo.comm.spawn(_push_sum_trace, s.world_size, "simulated", args=(s,))
    for k in range(s.steps):
        before = sum(r[k]["x_after_local_step"] for r in per_rank)
        after = sum(r[k]["theta"] * r[k]["w"] for r in per_rank)
        assert np.allclose(after, before, rtol=1e-13, atol=1e-13)
        assert abs(sum(r[k]["w"] for r in per_rank) - s.world_size) < 1e-12
    if graph is Star:
        assert max(abs(r[-1]["w"] - 1) for r in per_rank) > 1e-2  # weights really moved away from 1


def _push_sum_trace(comm, s: Setup):
    data = make_data(s)
    model, opt = build(comm, s, data[2])
    trace = []
    for k in range(s.steps):
        theta, w = model.theta(), opt.algorithm.weight.item()
        train(model, opt, s, data, k, k + 1, comm)
        grad = np.concatenate([model.x.grad.numpy(), [model.c.grad.item()]])
        trace.append(
            {
                "x_after_local_step": theta * w - lr_at(s, k) * grad,  # the step on the numerator x = z w
                "theta": model.theta(),
                "w": opt.algorithm.weight.item(),
            }
        )
    return trace


def test_scaled_and_raw_pseudo_gradients_agree_under_a_constant_lr_only():
    scaled = Setup("localsgd", outer=dict(tau=4, update=dict(alpha=0.9, beta=0.6)), lr=(0.05, 0.05))
    raw = scaled.with_(outer=dict(tau=4, update=dict(alpha=0.9, beta=0.6, pseudo_gradient="raw")))
    assert np.allclose(thetas(scaled), thetas(raw), rtol=0, atol=1e-13)
    decayed = dict(decay_at=5)
    assert not np.allclose(thetas(scaled.with_(**decayed)), thetas(raw.with_(**decayed)), atol=1e-6)


# --------------------------------------------------------------------------------------------- presets
def _local_steps(theta, a, y, lr, k, batch):
    """One plain local SGD step for every rank (no momentum), written out."""
    resid = np.einsum("rbd,rd->rb", a[:, k], theta[:, :-1]) + theta[:, -1:] - y[:, k]
    grad = np.concatenate([np.einsum("rbd,rb->rd", a[:, k], resid), resid.sum(1, keepdims=True)], axis=1) / batch
    return theta - lr * grad


def _preset_run(comm, s: Setup, preset: str, kwargs: dict):
    data = make_data(s)
    model, _ = build(comm, s.with_(outer=None), data[2])
    base = torch.optim.SGD([{"params": [model.x], "lr": s.lr[0]}, {"params": [model.c], "lr": s.lr[1]}], lr=0.1)
    kwargs = dict(kwargs)
    tau = kwargs.pop("k" if preset == "lookahead" else "tau")
    algorithm = slowmo.LocalSGD(slowmo.comm.Single() if preset == "lookahead" else comm)
    if preset == "bmuf":
        kwargs["world_size"] = comm.world_size
    opt = slowmo.SlowMo(model, base, algorithm, tau=tau, update=getattr(slowmo.presets, preset)(**kwargs))
    train(model, opt, s, data, 0, s.steps, comm)
    return {"theta": model.theta()}


@pytest.mark.parametrize("nesterov", [False, True])
def test_bmuf_preset_is_the_bmuf_update_written_out(nesterov):
    s = Setup("localsgd", steps=12, decay_at=6)
    eta, zeta, tau = 0.75, 0.9, 3
    a, y, theta0 = make_data(s)
    theta, w_g, delta = np.tile(theta0, (4, 1)), theta0.copy(), np.zeros_like(theta0)
    for k in range(s.steps):
        theta = _local_steps(theta, a, y, lr_at(s, k), k, s.batch)
        if (k + 1) % tau == 0:  # Chen & Huo: G = mean - W_g; Delta = eta Delta + zeta G; W_g += Delta (+ NBM)
            g = theta.mean(0) - w_g
            delta = eta * delta + zeta * g
            w_g = w_g + (eta * delta + zeta * g if nesterov else delta)
            theta = np.tile(w_g, (4, 1))
    kwargs = dict(tau=tau, block_lr=zeta, block_momentum=eta, nesterov=nesterov)
    got = np.stack([r["theta"] for r in slowmo.comm.spawn(_preset_run, 4, "simulated", args=(s, "bmuf", kwargs))])
    assert np.allclose(got, theta, rtol=0, atol=1e-12)


def test_bmuf_default_block_momentum_is_one_minus_one_over_m():
    def fn(comm):
        return slowmo.presets.bmuf(comm.world_size).beta

    assert slowmo.comm.spawn(fn, 4)[0] == pytest.approx(0.75)


def test_diloco_preset_is_torch_nesterov_sgd_on_the_raw_pseudo_gradient():
    s = Setup("localsgd", steps=12)
    tau, outer_lr, mu = 4, 0.7, 0.9
    a, y, theta0 = make_data(s)
    theta = np.tile(theta0, (4, 1))
    outer_param = torch.nn.Parameter(torch.tensor(theta0))
    outer = torch.optim.SGD([outer_param], lr=outer_lr, momentum=mu, nesterov=True)
    for k in range(s.steps):
        theta = _local_steps(theta, a, y, lr_at(s, k), k, s.batch)
        if (k + 1) % tau == 0:
            outer_param.grad = outer_param.detach() - torch.from_numpy(theta.mean(0))
            outer.step()
            theta = np.tile(outer_param.detach().numpy(), (4, 1))
    kwargs = dict(tau=tau, outer_lr=outer_lr, outer_momentum=mu)
    got = np.stack([r["theta"] for r in slowmo.comm.spawn(_preset_run, 4, "simulated", args=(s, "diloco", kwargs))])
    assert np.allclose(got, theta, rtol=0, atol=1e-12)


def test_lookahead_preset_is_lookahead_written_out():
    s = Setup("localsgd", world_size=1, steps=11, decay_at=4)
    k_fast, alpha = 3, 0.5
    a, y, theta0 = make_data(s)
    fast, slow = theta0[None].copy(), theta0.copy()
    for k in range(s.steps):
        fast = _local_steps(fast, a, y, lr_at(s, k), k, s.batch)
        if (k + 1) % k_fast == 0:  # phi <- phi + alpha (theta - phi); theta <- phi
            slow = slow + alpha * (fast[0] - slow)
            fast = slow[None].copy()
    got = slowmo.comm.spawn(_preset_run, 1, "simulated", args=(s, "lookahead", dict(k=k_fast, alpha=alpha)))
    assert np.allclose(got[0]["theta"], fast[0], rtol=0, atol=1e-12)
