"""The table of bad inputs (``tests/bad_inputs.py``) on real gloo processes: an error raised inside the ranks is the
launcher's one line, as on the simulated backend, and nothing already in the run directory is lost. (Not the cases
that choose their own launch, torchrun's environment or NCCL, nor the full disk, a patch of this process's file
writes that other processes do not see.)"""

import pytest

import bad_inputs
from bad_inputs import CASES, attempt

ON_GLOO = [case for case in CASES if case.gloo]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return bad_inputs.finished_run(tmp_path_factory)


@pytest.mark.parametrize("case", ON_GLOO, ids=[c.id for c in ON_GLOO])
def test_bad_input_on_gloo(case, finished_run, tmp_path, monkeypatch):
    attempt(case, "gloo", finished_run, tmp_path, monkeypatch)
