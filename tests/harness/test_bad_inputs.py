"""The table of bad inputs (``tests/bad_inputs.py``) on the simulated backend: each fails with exactly one line that
says what is wrong and what to do, and nothing an earlier run already wrote into the run directory is lost; and the
one-line errors of a config the project refuses."""

import socket

import pytest

from slowmo.train import compose, run

import bad_inputs
from bad_inputs import CASES, attempt


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return bad_inputs.finished_run(tmp_path_factory)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, finished_run, tmp_path, monkeypatch):
    attempt(case, "default", finished_run, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "args,line",
    [
        (["+foo=3"], "bad config key 'foo': Key 'foo' not in 'Config'"),
        (
            ["+train.max_step=3"],
            "bad config key 'train.max_step': Key 'max_step' not in 'TrainConfig'; did you mean train.max_steps?",
        ),
    ],
)
def test_a_config_the_project_refuses_is_one_line(args, line, tmp_path):
    with pytest.raises(ValueError) as info:
        run(compose([*args, f"run_dir={tmp_path}"]))
    assert str(info.value) == line


@pytest.mark.parametrize(
    "args,line",
    [
        (["slowmo=on", "slowmo.beta=0.5"], "slowmo.beta is the update's own knob now: slowmo.update.beta"),
        (
            ["slowmo=on", "slowmo.preset=bmuf"],
            "slowmo.preset is gone: slowmo=<preset> (on, bmuf, lookahead, diloco) sets the parts' defaults, "
            "slowmo.label names it",
        ),
    ],
)
def test_a_key_that_moved_into_a_part_is_one_line_naming_its_new_spelling(args, line):
    from slowmo.train.cli import check_command_line

    with pytest.raises(ValueError) as info:
        check_command_line(args, "train_digits")
    assert str(info.value) == line
    with pytest.raises(ValueError) as info:  # and as a dict of overrides, from Python
        run({"slowmo": {"enabled": True, args[1].split("=")[0].split(".")[1]: 0.5}})
    assert str(info.value) == line


def test_a_port_left_in_time_wait_by_a_preempted_job_is_free_again():
    # a requeued job's rank 0 finds the last attempt's rendezvous port in TIME_WAIT; torch's TCPStore binds it with
    # SO_REUSEADDR, so the check must not call it in use (only a listening socket is)
    from slowmo.comm.launch import check_port_free

    listener = socket.socket()  # the last attempt's store, with the option TCPStore sets
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection stays in TIME_WAIT on the port
    client.close()
    listener.close()
    check_port_free("127.0.0.1", port)
