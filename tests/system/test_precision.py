"""Mixed precision on the CPU: bf16 autocast trains with fp32 state; fp16's loss scaler skips a step on every rank
when one rank's gradient overflows, and the skipped step is not an inner step."""

import json
import math

import numpy as np
import pytest
import torch

from slowmo.comm import ring_all_reduce_bytes, spawn
from slowmo.train import checkpoint, loop, run, validate
from slowmo.train.precision import Precision

from problems import Setup, build, lr_at, make_data


def cfg(run_dir, **sections):
    base = {
        "run_dir": str(run_dir),
        "logger": {"progress": False, "log_every": 4},
        "train": {"max_steps": 40, "eval_every": 0},
        "dist": {"backend": "gloo", "world_size": 2},
        "algorithm": {"name": "localsgd", "period": 2},
        "slowmo": {"enabled": True, "tau": 4, "update": {"beta": 0.5}},
        "data": {"batch_size": 16},
        "optimizer": {"lr": 0.05},
    }
    for key, value in sections.items():  # another algorithm replaces the section (its keys are its own)
        same = key != "algorithm" or value.get("name") == base[key]["name"]
        base[key] = {**base.get(key, {}), **value} if same else value
    return base


def test_bf16_trains_and_every_state_stays_fp32(tmp_path):
    summary = run(cfg(tmp_path, train={"precision": "bf16", "checkpoint_every": 40}, model={"name": "cnn"}))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train_loss"] for line in lines]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["precision"] == "bf16" and summary["final"]["val_acc"] > 50
    for rank in (0, 1):
        state = checkpoint.load_rank(tmp_path / "checkpoints" / "step_40", rank)
        floats = [t for t in state["model"].values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float32 for t in floats)
        outer = state["optimizer"]["outer"]["update"]
        assert outer["v"].dtype == outer["x0"].dtype == torch.float32 and outer["v"].abs().sum() > 0  # v = gamma u
        buffers = [s["momentum_buffer"] for s in state["optimizer"]["base"]["state"].values()]
        assert buffers and all(b.dtype == torch.float32 for b in buffers)


def test_bf16_autocast_really_computes_in_bf16():
    precision = Precision("bf16", torch.device("cpu"), comm=None)
    layer = torch.nn.Linear(4, 4)
    with precision.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- fp16
def _fp16_rank(comm, config, run_dir, inject_at, scale):
    """One rank of a real run; rank 1's first parameter gets an infinite gradient in the ``inject_at``-th backward
    pass of this process (None: never). ``scale``: the first loss scale (None: the checkpoint's or GradScaler's).
    Returns what each step did."""
    trainer = loop._Trainer(comm, config, run_dir, None)
    if scale is not None:
        scaler = trainer.precision.scaler
        scaler.load_state_dict({**scaler.state_dict(), "scale": scale})
    taken, scales = [], []
    original = trainer.precision.backward_and_step

    def recording(loss, opt):
        ok = original(loss, opt)
        taken.append(ok)
        scales.append(trainer.precision.scale)
        return ok

    trainer.precision.backward_and_step = recording
    backwards = iter(range(1, 10**6))

    def poison(grad):
        return grad * math.inf if next(backwards) == inject_at and comm.rank == 1 else grad

    next(trainer.model.parameters()).register_hook(poison)
    summary = trainer.train()
    return {
        "taken": taken,
        "scales": scales,
        "inner": trainer.opt.inner_step,
        "outer": trainer.opt.outer_step,
        "summary": summary,
        "params": [p.detach().clone() for p in trainer.model.parameters()],
    }


def fp16_run(run_dir, inject_at, scale=None, backend="gloo", **sections):
    config = validate(
        cfg(
            run_dir,
            **{
                "model": {"name": "cnn", "width": 8},
                **sections,
                "train": {"precision": "fp16", **sections.get("train", {})},
            },
        )
    )
    return spawn(_fp16_rank, 2, backend, args=(config, run_dir, inject_at, scale), timeout=60)


@pytest.mark.parametrize("algorithm", [{"name": "localsgd", "period": 2}, {"name": "sgp"}])
def test_fp16_an_overflow_on_one_rank_skips_that_step_on_every_rank(tmp_path, algorithm):
    steps, tau, at = 16, 4, 9
    # a first scale of 8: nothing overflows by itself, so every skip below is the injected one
    clean = fp16_run(
        tmp_path / "clean", None, 8.0, algorithm=algorithm, train={"max_steps": steps}, slowmo={"tau": tau}
    )
    hit = fp16_run(tmp_path / "hit", at, 8.0, algorithm=algorithm, train={"max_steps": steps}, slowmo={"tau": tau})
    assert all(r["taken"] == [True] * steps for r in clean)
    expected = [step != at for step in range(1, steps + 1)]
    assert hit[0]["taken"] == hit[1]["taken"] == expected  # rank 0's gradient was finite, and it skipped too
    assert hit[0]["scales"] == hit[1]["scales"]
    assert hit[0]["scales"][at - 1] == hit[0]["scales"][at - 2] / 2  # backed off, on both
    for r in hit:
        # a skipped step is not an inner step: 15 applied inner steps, outer steps after applied steps 4, 8, 12
        assert r["inner"] == steps - 1 and r["outer"] == (steps - 1) // tau
        assert r["summary"]["status"] == "completed" and r["summary"]["steps"] == steps
        assert r["summary"]["skipped_steps"] == 1
        by_kind = r["summary"]["comm_bytes_by_kind"]
        assert by_kind["control/all_reduce"] == steps * ring_all_reduce_bytes(4, 2)  # one 4-byte flag per step
    assert all(
        torch.equal(a, b) for a, b in zip(hit[0]["params"], hit[1]["params"], strict=True)
    )  # the final exact average
    assert not all(torch.equal(a, b) for a, b in zip(hit[0]["params"], clean[0]["params"], strict=True))


def test_fp16_scaler_state_is_checkpointed_and_resumed(tmp_path):
    straight = fp16_run(tmp_path / "straight", 5, backend="simulated", train={"max_steps": 24})
    fp16_run(tmp_path / "resumed", 5, backend="simulated", train={"max_steps": 12, "checkpoint_every": 12})
    state = checkpoint.load_rank(tmp_path / "resumed" / "checkpoints" / "step_12", 1)
    assert state["precision"]["scaler"]["scale"] == 2.0**15 and state["precision"]["skipped"] == 1
    resumed = fp16_run(tmp_path / "resumed", None, backend="simulated", train={"max_steps": 24, "checkpoint_every": 12})
    assert resumed[0]["scales"] == straight[0]["scales"][12:]  # the scale went on from the checkpoint's
    assert resumed[0]["summary"]["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(straight[0]["params"], resumed[0]["params"], strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_transformer_trains_and_decodes_under_cpu_autocast(tmp_path, precision):
    """torch's fused encoder path ignores CPU autocast; the model must take the regular path there (evaluation)."""
    from datasets import write_parallel

    root = write_parallel(tmp_path / "wmt")
    summary = run(
        {
            "run_dir": str(tmp_path / "run"),
            "task": {"name": "wmt16", "max_decode_len": 4},
            "model": {"name": "transformer_tiny"},
            "optimizer": {"name": "adam", "lr": 0.001},
            "data": {"root": str(root), "max_tokens": 64, "vocab_size": 40, "eval_batch_size": 4},
            "train": {"max_steps": 4, "eval_every": 2, "precision": precision},
            "dist": {"world_size": 2},
            "logger": {"progress": False, "log_every": 2},
        }
    )
    assert summary["precision"] == precision and 0 <= summary["final"]["val_bleu"] <= 100
    assert math.isfinite(summary["final"]["val_loss"])


def _clipped_run(comm, s, max_norm):
    a, y, theta0 = make_data(s)
    model, opt = build(comm, s, theta0)
    precision = Precision("fp32", torch.device("cpu"), comm, clip_grad_norm=max_norm)
    for k in range(s.steps):
        lrs = lr_at(s, k)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = float(lrs[0]), float(lrs[-1])
        opt.zero_grad()
        precision.backward_and_step(model.loss(a[comm.rank, k], y[comm.rank, k]), opt)
    return model.theta()


def _clipped_reference(s, max_norm):
    """SGD with Nesterov momentum on g * min(1, c / ||g||), g the mean gradient (AR-SGD) or each rank's own (Local SGD,
    averaged every H steps), written from the definitions; also how many gradients were clipped."""
    a, y, theta0 = make_data(s)
    n = s.world_size
    theta, buf, clipped = np.tile(theta0, (n, 1)), np.zeros((n, s.d + 1)), 0
    for k in range(s.steps):
        resid = np.einsum("rbd,rd->rb", a[:, k], theta[:, :-1]) + theta[:, -1:] - y[:, k]
        grads = np.concatenate([np.einsum("rbd,rb->rd", a[:, k], resid), resid.sum(1, keepdims=True)], 1) / s.batch
        if s.algorithm == "allreduce":
            grads = np.tile(grads.mean(0), (n, 1))
        norms = np.linalg.norm(grads, axis=1, keepdims=True)
        clipped += int((norms > max_norm).sum())
        grads = grads * np.minimum(1.0, max_norm / (norms + 1e-6))  # torch adds 1e-6 too
        buf = s.momentum * buf + grads
        theta = theta - lr_at(s, k) * (grads + s.momentum * buf)
        if s.algorithm == "localsgd" and (k + 1) % s.period == 0:
            theta[:] = theta.mean(0)
    return theta, clipped


@pytest.mark.parametrize("algorithm", ["allreduce", "localsgd"])
def test_gradient_clipping_clips_the_gradient_the_base_step_uses(algorithm):
    s = Setup(algorithm, period=3, momentum=0.9, nesterov=True, steps=10, lr=(0.1, 0.05))
    expected, clipped = _clipped_reference(s, max_norm=2.0)
    assert 0 < clipped < s.steps * s.world_size  # the bound is active on some steps only
    got = np.stack(spawn(_clipped_run, s.world_size, "simulated", args=(s, 2.0)))
    assert np.allclose(got, expected, rtol=0, atol=1e-12)
