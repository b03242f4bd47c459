"""Post-local SGD: LocalSGD(period=H, warmup_steps=K) takes the gradient mean over all ranks at inner steps k < K, then
local steps with the parameter average after steps k >= K with (k + 1) % H == 0.

Checked against a plain-NumPy reference written from those equations (and Algorithm 1's outer step;
``tests/post_local.py``), against the bytes formula, and for bit-exact resume, on simulated ranks (against PyTorch's
own post-local SGD on gloo: system/test_post_local_on_gloo.py)."""

import numpy as np
import pytest

import slowmo

from post_local import (
    CASES,
    N,
    _load_into_warmup,
    _resumed,
    _run,
    check_bytes,
    expected_bytes,
    histories,
    post_local_reference,
)
from problems import Setup


@pytest.mark.parametrize("name", list(CASES))
def test_engine_equals_the_numpy_reference(name):
    s, warmup = CASES[name]
    got, want = histories(s, warmup), post_local_reference(s, warmup)
    assert np.allclose(got, want, rtol=0, atol=1e-12), np.abs(got - want).max()
    assert np.ptp(got[warmup - 1], axis=0).max() == 0  # the replicas are the same bits after the warm-up ...
    assert np.ptp(want[warmup:], axis=1).max() > 1e-4  # ... and apart after some later local step
    plain = post_local_reference(s, 0)  # the warm-up changes the run
    assert np.abs(got[-1] - plain[-1]).max() > 1e-4


@pytest.mark.parametrize(
    "s",
    [Setup("localsgd", period=3, momentum=0.9), Setup("localsgd", period=2, outer=dict(tau=4, update=dict(beta=0.6)))],
    ids=["H3", "H2 slowmo"],
)
def test_warmup_zero_is_bit_identical_to_local_sgd_without_it(s):
    without = slowmo.comm.spawn(_run, N, "simulated", args=(s, None))
    zero = slowmo.comm.spawn(_run, N, "simulated", args=(s, 0))
    for a, b in zip(without, zero, strict=True):
        assert np.array_equal(a["history"], b["history"])
        assert a["stats"] == b["stats"]
        assert a["state"] == b["state"] == {}


@pytest.mark.parametrize("name", ["H3 K5", "H2 K3 slowmo tau4", "Hnone K6 slowmo tau4 alpha0.7", "H3 K4 nodes"])
def test_bytes_equal_the_formula(name):
    s, warmup = CASES[name]
    ranks = slowmo.comm.spawn(_run, N, "simulated", args=(s, warmup))
    check_bytes([r["stats"] for r in ranks], s, warmup)


def test_bytes_formula_by_hand():
    # H3 K5, 14 steps: 5 gradient all-reduces, averages after k = 5, 8, 11: 8 all-reduces of 48 bytes (72 each).
    assert expected_bytes(*CASES["H3 K5"]) == {"all_reduce": 8 * 72}
    # H2 K3 tau4: Local SGD's averages after k = 5, 9, 13; SlowMo's after k = 3 (the first local step), 7, 11.
    assert expected_bytes(*CASES["H2 K3 slowmo tau4"]) == {"all_reduce": (3 + 3 + 3) * 72}
    # no H, K6 tau4: SlowMo's after k = 7, 11; none after k = 3, a warm-up step (the replicas are equal).
    assert expected_bytes(*CASES["Hnone K6 slowmo tau4 alpha0.7"]) == {"all_reduce": (6 + 2) * 72}
    # H3 K4, nodes of 2: 4 all-reduces over all ranks, averages after k = 5, 8, 11; 10 node means (48 bytes each).
    assert expected_bytes(*CASES["H3 K4 nodes"]) == {"all_reduce": (4 + 3) * 72, "node/all_reduce": 10 * 48}


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stop", [3, 7], ids=["mid warm-up", "after it"])
@pytest.mark.parametrize("name", ["H3 K5", "H2 K5 nodes slowmo tau4"])
def test_resume_is_bit_exact(name, stop):
    s, warmup = CASES[name]
    straight = slowmo.comm.spawn(_run, N, "simulated", args=(s, warmup))
    resumed = slowmo.comm.spawn(_resumed, N, "simulated", args=(s, warmup, stop))
    for a, b in zip(straight, resumed, strict=True):
        assert np.array_equal(a["history"][-1], b["theta"])
        assert a["stats"] == b["stats"]


def test_a_checkpoint_without_the_step_counter_is_refused():
    with pytest.raises(ValueError, match=r"no step counter \(saved with warmup_steps=0\); resume with warmup_steps=0"):
        slowmo.comm.spawn(_load_into_warmup, 2, "simulated")


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_bad_warmup_steps_is_one_value_error(value):
    with pytest.raises(ValueError, match="LocalSGD warmup_steps must be an integer >= 0") as info:
        slowmo.LocalSGD(slowmo.comm.Single(), period=2, warmup_steps=value)
    assert "\n" not in str(info.value)


def test_bad_warmup_steps_in_the_config_is_one_line():
    from slowmo.train import ConfigError, compose, validate

    with pytest.raises(ConfigError) as info:
        validate(compose(["algorithm=localsgd", "algorithm.warmup_steps=-1", "run_dir=x"]))
    assert str(info.value) == "algorithm.warmup_steps must be an integer >= 0 (0: no warm-up), got -1"
    assert validate(compose(["algorithm=localsgd", "run_dir=x"])).algorithm.warmup_steps == 0
    assert (
        validate(compose(["algorithm=localsgd", "algorithm.warmup_steps=7", "run_dir=x"])).algorithm.warmup_steps == 7
    )
