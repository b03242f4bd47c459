"""What a resume and a heal unpickle: tensors and plain data, nothing else. A run's checkpoint (OSGP under SlowMo: the
message in flight, the slow buffers, Nesterov momentum, the RNG) loads with ``torch.load(weights_only=True)``; a
checkpoint file that holds any other pickled object, header and checksum valid (anyone who can write to the run
directory can write one), is refused in one line, never executed, and a resume goes back to the previous checkpoint;
the state a peer sends to heal an elastic replica is read the same way."""

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

from slowmo.comm import CommError
from slowmo.comm.elastic import decode_state, encode_state
from slowmo.train import checkpoint, run


class _Planted:
    """An object that, unpickled, makes a directory: the trace of code run by a load."""

    def __init__(self, trace: Path) -> None:
        self.trace = trace

    def __reduce__(self):
        return os.mkdir, (str(self.trace),)


def _plant(path: Path, trace: Path) -> None:
    """Replace the checkpoint file ``path`` with one holding a :class:`_Planted`, its header and checksum valid."""
    buffer = io.BytesIO()
    torch.save({"model": _Planted(trace)}, buffer)
    payload = buffer.getvalue()
    path.write_bytes(
        f"slowmo-checkpoint {checkpoint.VERSION} {hashlib.sha256(payload).hexdigest()}\n".encode() + payload
    )


def _run(run_dir: Path, max_steps: int) -> dict:
    return run(
        {
            "run_dir": str(run_dir),
            "algorithm": {"name": "osgp"},
            "slowmo": {"enabled": True, "tau": 5, "update": {"beta": 0.6}},
            "train": {"max_steps": max_steps, "checkpoint_every": 5, "eval_every": 0},
            "logger": {"progress": False, "log_every": 5},
            "dist": {"world_size": 4},
            "data": {"batch_size": 16},
        }
    )


def test_a_checkpoint_loads_as_tensors_and_plain_data(tmp_path: Path) -> None:
    _run(tmp_path, 10)
    for file in sorted((tmp_path / "checkpoints" / "step_10").glob("rank*.pt")):
        state = torch.load(io.BytesIO(file.read_bytes().partition(b"\n")[2]), weights_only=True)
        assert {"model", "optimizer", "rng", "fingerprint", "step", "position"} <= set(state)
        assert state["step"] == 10 and isinstance(state["rng"], torch.Tensor)


def test_a_checkpoint_holding_another_pickled_object_is_refused_not_run(tmp_path: Path, capsys) -> None:
    _run(tmp_path, 10)
    trace, newest = tmp_path / "trace", tmp_path / "checkpoints" / "step_10"
    for file in newest.glob("rank*.pt"):
        _plant(file, trace)
    with pytest.raises(ValueError) as refused:
        checkpoint.load_rank(newest, 0)
    assert str(refused.value) == (
        f"{newest / 'rank0.pt'}: holds a pickled posix.mkdir, not only tensors and plain data; not loaded (a slowmo "
        "checkpoint never holds one: this file was not written by slowmo)"
    )
    summary = _run(tmp_path, 15)
    assert summary["status"] == "completed" and summary["steps"] == 15
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resuming")]
    assert said == [  # the previous checkpoint, in one line that says why the newest was skipped
        f"resuming at step 5 from {tmp_path / 'checkpoints' / 'step_5'} (step_10: rank0.pt: holds a pickled "
        "posix.mkdir, not only tensors and plain data; not loaded (a slowmo checkpoint never holds one: this file was "
        "not written by slowmo): skipped)"
    ]
    assert not trace.exists()


def test_a_peers_state_for_a_heal_is_read_as_tensors_and_plain_data() -> None:
    state = {"model": {"w": torch.arange(3.0)}, "step": 12, "best": {"val_acc": 91.5}, "betas": (0.9, 0.99)}
    received = decode_state(encode_state(state))
    assert torch.equal(received["model"]["w"], state["model"]["w"])
    assert {k: received[k] for k in ("step", "best", "betas")} == {k: state[k] for k in ("step", "best", "betas")}


def test_a_peers_state_holding_another_pickled_object_is_refused_not_run(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    with pytest.raises(CommError) as refused:
        decode_state(encode_state({"model": _Planted(trace)}))
    assert str(refused.value) == "a peer's state holds a pickled posix.mkdir, not only tensors and plain data; refused"
    assert not trace.exists()


def test_a_checkpoint_with_state_laid_out_by_its_k_is_refused_another_k_in_one_line(tmp_path):
    """Resharding keeps what is per parameter (the base optimizer's state, x_{t,0} and u); OSGP's message in flight is
    laid out by the checkpoint's k: refused, naming where it is and the k to resume with."""
    from slowmo.flat import PER_PARAMETER
    from slowmo.train.loop import reshardable

    per_parameter = {PER_PARAMETER: [torch.zeros(3, 2), torch.zeros(4)]}
    fine = {
        "optimizer": {
            "base": {"state": {0: {"momentum_buffer": torch.zeros(3, 2)}}},
            "outer": {"update": {"x0": per_parameter, "v": per_parameter}, "mean": {}},
            "algorithm_state": {"weight": torch.ones(1)},
        }
    }
    reshardable(fine, tmp_path, 2)  # (nothing laid out by k: no error)
    fine["optimizer"]["algorithm_state"]["in_flight"] = [torch.zeros(10)]
    with pytest.raises(ValueError) as error:
        reshardable(fine, tmp_path, 2)
    message = str(error.value)
    assert "\n" not in message
    assert "optimizer/algorithm_state/in_flight/0" in message and "dist.replica_size=2" in message
