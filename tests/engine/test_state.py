"""state_dict() mid-outer-iteration resumes bit-exactly, for every algorithm; bad states are refused clearly."""

import io

import numpy as np
import pytest
import torch

import slowmo

from problems import Setup, build, make_data, run_engine, train

CASES = {
    "localsgd+slowmo": Setup("localsgd", outer=dict(tau=4, update=dict(beta=0.6)), momentum=0.9, nesterov=True),
    "sgp+slowmo": Setup("sgp", outer=dict(tau=4, update=dict(beta=0.5)), momentum=0.9),
    "osgp+slowmo": Setup("osgp", outer=dict(tau=4, update=dict(beta=0.5))),
    "osgp": Setup("osgp", momentum=0.9),
    "sgp+slowmo sharded": Setup("sgp", outer=dict(tau=4, update=dict(beta=0.5), mean=dict(name="sharded"))),
    "allreduce": Setup("allreduce", momentum=0.9),
    "localsgd+slowmo int8 error feedback, outer adam": Setup(
        "localsgd",
        outer=dict(
            tau=4,
            update=dict(name="torch", optimizer="Adam", options=dict(betas=(0.5, 0.999), eps=1e-08), alpha=0.3),
            mean=dict(name="compressed", codec="int8", error_feedback=True),
        ),
        d=40,
    ),
    "localsgd+slowmo eager (an all-reduce in flight)": Setup(
        "localsgd", outer=dict(tau=4, update=dict(beta=0.5), mean=dict(name="eager"))
    ),
    "localsgd+slowmo streaming (a fragment in flight)": Setup(
        "localsgd",
        outer=dict(
            tau=4,
            update=dict(name="torch", optimizer="Adam", options=dict(betas=(0.9, 0.999), eps=1e-08), alpha=0.1),
            fragments=dict(count=2, delay=1, mix=0.6),
        ),
        momentum=0.9,
    ),
    "osgp+slowmo eager int8 (an all-to-all of codes in flight)": Setup(
        "osgp",
        outer=dict(tau=4, update=dict(beta=0.5), mean=dict(name="eager", codec="int8", error_feedback=True)),
        d=40,
    ),
    "osgp+slowmo streaming int8 (a compressed fragment in flight)": Setup(
        "osgp",
        outer=dict(
            tau=4,
            update=dict(beta=0.5),
            mean=dict(name="compressed", codec="int8", error_feedback=True),
            fragments=dict(count=2, delay=2),
        ),
        momentum=0.9,
        d=40,
    ),
    "sgp+slowmo outer nesterov, clipped": Setup(
        "sgp",
        outer=dict(
            tau=4, clip_norm=0.05, update=dict(name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True))
        ),
        momentum=0.9,
    ),
}

STREAMED = CASES["osgp+slowmo streaming int8 (a compressed fragment in flight)"]
CASES["localsgd+slowmo streaming int8 (a scale per row), the outer state in host memory"] = STREAMED.with_(
    algorithm="localsgd",
    outer={
        **STREAMED.outer,
        "mean": dict(name="compressed_rows", codec="int8", error_feedback=True),
        "state_device": "cpu",
    },
)


def _interrupted(comm, s: Setup, stop: int):
    data = make_data(s)
    model, opt = build(comm, s, data[2])
    train(model, opt, s, data, 0, stop, comm)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    del model, opt
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    model, opt = build(comm, s, data[2] + 1.0)  # a different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, s, data, stop, s.steps, comm)
    out = {"theta": model.theta()}
    opt.algorithm.flush()
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("stop", [6, 8])  # mid outer iteration (tau=4), and right after an outer step
def test_resume_is_bit_exact(name, stop):
    s = CASES[name]
    straight = slowmo.comm.spawn(run_engine, 4, "simulated", args=(s,))
    resumed = slowmo.comm.spawn(_interrupted, 4, "simulated", args=(s, stop))
    for a, b in zip(straight, resumed, strict=True):
        assert np.array_equal(a["theta"], b["theta"])


def _load(comm, saved_setup: Setup, new_setup: Setup):
    data = make_data(saved_setup)
    model, opt = build(comm, saved_setup, data[2])
    train(model, opt, saved_setup, data, 0, 3, comm)
    state = opt.state_dict()
    opt.algorithm.flush()
    _, other = build(comm, new_setup, data[2])
    other.load_state_dict(state)


@pytest.mark.parametrize(
    "saved,new,message",
    [
        (
            Setup("sgp", outer=dict(tau=4)),
            Setup("localsgd", outer=dict(tau=4)),
            "the checkpoint was saved by algorithm SGP but this run uses LocalSGD",
        ),
        (
            Setup("sgp", outer=dict(tau=4)),
            Setup("sgp"),
            "the checkpoint was saved by optimizer SlowMo but this run uses DistributedOptimizer",
        ),
        (
            Setup("sgp", outer=dict(tau=4)),
            Setup("sgp", outer=dict(tau=4, mean=dict(name="sharded"))),
            "resume with the same model, world size and mean",
        ),
    ],
)
def test_loading_a_mismatched_state_is_refused(saved, new, message):
    with pytest.raises(ValueError, match=message):
        slowmo.comm.spawn(_load, 4, "simulated", args=(saved, new))


def test_loading_something_else_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = slowmo.SlowMo([p], torch.optim.SGD([p], lr=0.1), slowmo.LocalSGD(slowmo.comm.Single()), tau=2)
    with pytest.raises(ValueError, match="not a slowmo optimizer state"):
        opt.load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())


def test_a_state_of_the_format_before_the_parts_is_refused_in_one_line():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = slowmo.SlowMo([p], torch.optim.SGD([p], lr=0.1), slowmo.LocalSGD(slowmo.comm.Single()), tau=2)
    old = opt.state_dict() | {"format": "slowmo/1"}  # SlowMo's state before its outer step became parts
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(old)
    assert str(info.value) == (
        "a SlowMo state of format slowmo/1, and this SlowMo reads slowmo/2 (slowmo/2: the outer step as parts); "
        "resume it with the slowmo that wrote it, or start a new run directory"
    )
