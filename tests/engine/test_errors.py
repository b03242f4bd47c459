"""Bad input gets a one-line ValueError that says what is wrong and what to do."""

import pytest
import torch

import slowmo
from slowmo.comm import Single


def _model():
    return torch.nn.Linear(3, 1)


def _slowmo(**kwargs):
    """SlowMo with ``kwargs``: tau and base_buffers its own, the others its update's (Algorithm 1's)."""
    model = _model()
    own = {key: kwargs.pop(key) for key in ("tau", "base_buffers") if key in kwargs}
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    return slowmo.SlowMo(model, base, slowmo.LocalSGD(Single()), **own, update=slowmo.SlowMomentum(**kwargs))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tau=0), r"tau must be an integer >= 1 \(inner steps per outer step\), got 0"),
        (dict(tau=2.5), r"tau must be an integer >= 1"),
        (dict(alpha=0.0), r"alpha must be a finite number > 0 \(slow learning rate; the paper uses 1.0\), got 0.0"),
        (dict(alpha=-1.0), r"alpha must be a finite number > 0"),
        (dict(beta=1.0), r"beta must be in \[0, 1\) \(slow momentum; the paper tunes it in 0.4-0.8\), got 1.0"),
        (dict(beta=-0.1), r"beta must be in \[0, 1\)"),
        (dict(base_buffers="zero"), r"base_buffers must be 'keep', 'reset' or 'average', got 'zero'"),
        (dict(pseudo_gradient="delta"), r"pseudo_gradient must be 'scaled' \(SlowMo\) or 'raw' \(BMUF/DiLoCo\)"),
    ],
)
def test_bad_slowmo_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _slowmo(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("algorithm", [slowmo.SGP, slowmo.OSGP])
def test_gossip_needs_two_ranks(algorithm):
    with pytest.raises(
        ValueError,
        match=rf"{algorithm.__name__} gossips between ranks and needs at least 2, got 1; "
        "use LocalSGD or AllReduce on a single rank",
    ):
        algorithm(Single())


def test_gossip_needs_two_nodes():
    with pytest.raises(ValueError, match="SGP gossips between nodes and needs at least 2, got 1"):
        slowmo.comm.spawn(lambda comm: slowmo.SGP(comm, procs_per_node=4), 4)


def test_graph_of_the_wrong_size():
    with pytest.raises(ValueError, match="the gossip graph has 3 ranks but gossip runs over 4"):
        slowmo.comm.spawn(lambda comm: slowmo.SGP(comm, slowmo.Ring(3)), 4)


def test_base_optimizer_over_other_parameters():
    model, other = _model(), _model()
    with pytest.raises(
        ValueError,
        match=r"the base optimizer's parameters are not the model's \(2 of the model's "
        r"missing from it, 2 of its own not in the model\)",
    ):
        slowmo.SlowMo(model, torch.optim.SGD(other.parameters(), lr=0.1), slowmo.LocalSGD(Single()))


def test_non_float_parameter():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(2,\)\) has dtype torch.int64; only floating-point"):
        slowmo.SlowMo([p], torch.optim.SGD([p], lr=0.1), slowmo.LocalSGD(Single()))


def test_local_sgd_period():
    with pytest.raises(ValueError, match="LocalSGD period must be an integer >= 1 or None"):
        slowmo.LocalSGD(Single(), period=0)


def test_zero_lr_at_an_outer_step():
    opt = _slowmo(tau=1)
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match="SlowMo divides by the base lr at the outer step, but it is 0.0"):
        opt.step()


def _hooked_then_dropped(comm):
    """A DistributedOptimizer over AllReduce, stepped once and dropped: the next backward pass leaves the gradients
    where autograd puts them (no hook of the dropped optimizer moves them into its buffer)."""
    import gc

    model = _model()
    opt = slowmo.DistributedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), slowmo.AllReduce(comm))
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    hooked = model.weight.grad.data_ptr() == opt.flat.grad.data_ptr()  # a view of the flat gradient
    flat_grad = opt.flat.grad
    del opt
    gc.collect()
    model.weight.grad = None
    model(torch.ones(2, 3)).sum().backward()
    return hooked, model.weight.grad.data_ptr() != flat_grad.data_ptr()


def test_a_dropped_optimizer_leaves_no_hook_behind():
    assert slowmo.comm.spawn(_hooked_then_dropped, 2) == [(True, True), (True, True)]


def test_a_replaced_optimizer_refuses_to_step():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    first = slowmo.DistributedOptimizer(model, base, slowmo.LocalSGD(Single()))
    slowmo.DistributedOptimizer(model, base, slowmo.LocalSGD(Single()))  # takes the parameters over
    with pytest.raises(RuntimeError, match="this optimizer's parameters no longer live in its flat buffer: a newer"):
        first.step()
