"""The simulator's virtual clock (slowmo.comm.clock): each rank's time computed by hand from the link model's formulas
for a 3-rank ring all-reduce, a gossip step and an all-reduce overlapped with compute; off the clock, the harness's
bookkeeping; and the identity: a run on the clock is the run without it, bit for bit."""

import json

import pytest
import torch

import slowmo
from slowmo import report
from slowmo.comm.clock import Clock, ClockConfig
from slowmo.train import compose, run

MS = 1e-3


def _config(**changes) -> ClockConfig:
    values = dict(
        name="test",
        step_ms=10.0,
        speeds=[1.0],
        straggle=0.0,
        slowdown=1.0,
        latency_ms=1.0,
        regions=3,
        inside_gbps=None,
        between_gbps=None,
    )
    return ClockConfig(**{**values, **changes})


def _ring(comm):
    comm.computed()  # ranks' speeds 1, 1/2, 1/4: 10, 20 and 40 ms
    comm.all_reduce(torch.ones(3000))  # 12,000 bytes
    return comm.time()


def test_a_ring_all_reduce_completes_at_the_last_arrival_plus_2_n_minus_1_latencies_and_pieces():
    # links, Gbit/s: 0 -> 1 at 8, 1 -> 2 at 0.8, 2 -> 0 at 4; the ring's pace is its slowest link, 0.8 Gbit/s = 1e8 B/s
    between = [[100.0, 8.0, 8.0], [8.0, 100.0, 0.8], [4.0, 8.0, 100.0]]
    clock = Clock(_config(speeds=[1.0, 0.5, 0.25], between_gbps=between), 3)
    times = slowmo.comm.spawn(_ring, 3, "simulated", clock=clock)
    expected = 40 * MS + 2 * 2 * (1 * MS + 12_000 / 3 / 1e8)  # 40 ms + 4 x (1 ms + 40 us)
    assert times == pytest.approx([expected] * 3, rel=1e-12)


def _gossip(comm):
    comm.computed()  # speeds 1 and 1/2: rank 0 at 10 ms, rank 1 at 20 ms
    out = torch.empty(1000)
    if comm.rank == 0:
        comm.isend(torch.ones(1000), 1).wait()  # leaves at 10 ms, arrives 10 + 1 + 4 = 15 ms: rank 1 is at 20 ms
        comm.irecv(out, 1).wait()  # rank 1's leaves at 20 ms, arrives at 25 ms: rank 0 waits from 10 to 25 ms
    else:
        comm.irecv(out, 0).wait()
        comm.isend(torch.ones(1000), 0).wait()
    return comm.time()


def test_a_message_arrives_a_latency_and_its_bytes_later_and_a_receiver_waits_only_for_a_later_one():
    clock = Clock(_config(speeds=[1.0, 0.5], regions=2, between_gbps=0.008), 2)  # 1e6 B/s: 4,000 bytes in 4 ms
    assert slowmo.comm.spawn(_gossip, 2, "simulated", clock=clock) == pytest.approx([25 * MS, 20 * MS], rel=1e-12)


def _overlapped(comm, ints: int):
    comm.computed()  # 10 ms
    work = comm.all_reduce_async(torch.ones(ints))
    comm.computed()  # 20 ms: the all-reduce runs meanwhile
    work.wait()
    with comm.uncounted():  # the harness's bookkeeping takes no time
        comm.all_reduce(torch.ones(10**6))
        comm.barrier()
    return comm.time()


@pytest.mark.parametrize("ints,expected", [(750, 20 * MS), (75_000, 10 * MS + 2 * 2 * (1 * MS + 100_000 / 1e6))])
def test_an_asynchronous_all_reduce_hides_behind_compute_until_it_takes_longer(ints, expected):
    clock = Clock(_config(between_gbps=0.008), 3)  # 1e6 B/s; 3,000 bytes: 4 x (1 + 1) = 8 ms < 10 ms of compute
    assert slowmo.comm.spawn(_overlapped, 3, "simulated", args=(ints,), clock=clock) == pytest.approx([expected] * 3)


def _back_to_back(comm):
    comm.computed()  # 10 ms
    first, second = comm.all_reduce_async(torch.ones(750)), comm.all_reduce_async(torch.ones(750))  # 3,000 bytes
    first.wait()
    after_first = comm.time()
    second.wait()
    out = torch.empty(250)
    if comm.rank == 0:  # two messages of 1,000 bytes: the second leaves once the first has (1 ms of bytes each)
        comm.isend(torch.ones(250), 1)
        comm.isend(torch.ones(250), 1)
    elif comm.rank == 1:
        comm.irecv(out, 0).wait()
        comm.irecv(out, 0).wait()
    return after_first, comm.time()


def test_a_groups_collectives_and_a_ranks_messages_go_over_its_links_one_after_another():
    clock = Clock(_config(between_gbps=0.008), 3)  # 1e6 B/s
    results = slowmo.comm.spawn(_back_to_back, 3, "simulated", clock=clock)
    all_reduce = 2 * 2 * (1 * MS + 1_000 / 1e6)  # 8 ms each
    assert [r[0] for r in results] == pytest.approx([10 * MS + all_reduce] * 3)
    done = 10 * MS + 2 * all_reduce  # the second all-reduce starts when the first is done
    # rank 0's messages leave at 26 ms: 1 ms of bytes each, then 1 ms of latency: rank 1 has both at 26 + 2 + 1 ms
    assert [r[1] for r in results] == pytest.approx([done, done + 3 * MS, done])


def test_straggler_steps_are_drawn_per_rank_and_step_and_the_same_in_every_run():
    cfg = _config(straggle=0.3, slowdown=4.0, regions=1)
    draws = [[Clock(cfg, 2, seed=7).step_time(rank, step) for step in range(200)] for rank in range(2)]
    again = [[Clock(cfg, 2, seed=7).step_time(rank, step) for step in range(200)] for rank in range(2)]
    assert draws == again and draws[0] != draws[1]
    for times in draws:
        slow = sum(t == pytest.approx(40 * MS) for t in times)
        assert set(round(t / MS, 9) for t in times) == {10.0, 40.0} and 40 <= slow <= 80  # about 0.3 x 200


@pytest.mark.parametrize("algorithm", ["allreduce", "localsgd", "sgp", "osgp"])
def test_a_run_on_the_clock_is_the_run_without_it_bit_for_bit(tmp_path, algorithm):
    """SlowMo over each base on 4 simulated ranks, with and without the mixed-speed clock: the same metrics but the
    time, which grows with the slowest rank's steps (4 steps of 400 ms before the first record) and the links."""
    common = [f"algorithm={algorithm}", "slowmo=on", "slowmo.tau=4", "train.max_steps=16", "logger.log_every=4"]
    common += ["logger.progress=false", "train.eval_every=8"]
    records = {}
    for name, extra in (("plain", []), ("clock", ["dist/clock=mixed"])):
        run(compose([*common, *extra, f"run_dir={tmp_path / name}"]))
        records[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(records["plain"]) == len(records["clock"]) >= 4
    for plain, timed in zip(records["plain"], records["clock"], strict=True):
        assert {k: v for k, v in timed.items() if k not in ("wall_time", "sim_time")} == {
            k: v for k, v in plain.items() if k != "wall_time"
        }
    times = [r["sim_time"] for r in records["clock"] if "sim_time" in r]
    assert times[0] >= 4 * 0.4 and times == sorted(times) and "sim_time" not in records["plain"][0]
    runs = [report.load_run(tmp_path / name) for name in ("plain", "clock")]
    assert report.on_the_clock(runs[1:]) and not report.on_the_clock(runs)
    report.figure(runs[1:], tmp_path / "curves.png", "sim_time")  # the curves against the simulated time
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert report.table(runs[1:])[0]["sim_time_s"] == times[-1] and "sim_time_s" not in report.table(runs[:1])[0]


def test_a_resumed_run_goes_on_from_its_clock(tmp_path):
    """OSGP + SlowMo on the mixed clock, run to 8 steps (a checkpoint there) and resumed to 16: the records after step 8
    are the uninterrupted run's, its simulated time included (each rank's time, steps and link are in its
    checkpoint)."""
    common = ["algorithm=osgp", "slowmo=on", "slowmo.tau=4", "dist/clock=mixed", "logger.progress=false"]
    common += ["logger.log_every=4", "train.eval_every=0", "train.checkpoint_every=8"]
    run(compose([*common, "train.max_steps=16", f"run_dir={tmp_path / 'whole'}"]))
    for steps in (8, 16):
        run(compose([*common, f"train.max_steps={steps}", f"run_dir={tmp_path / 'resumed'}"]))
    records = {}
    for name in ("whole", "resumed"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]
    after = {name: [r for r in rs if r["step"] > 8] for name, rs in records.items()}  # (the 8-step run ended at 8)
    assert after["whole"] == after["resumed"] and len(after["whole"]) == 2 and after["whole"][-1]["sim_time"] > 1.6


def test_a_record_is_timed_when_every_rank_is_done_with_its_step(tmp_path):
    """Local SGD that does not average within the run, on the mixed clock (speeds 1 to 1/4, 100 ms a step at speed
    1): the records after steps 4 and 8 read the slowest rank's time, 4 x 400 ms and 8 x 400 ms (rank 0's own would be
    4 x 100 ms), plus the start's broadcast of a few kB."""
    common = ["algorithm=localsgd", "algorithm.period=100", "train.max_steps=8", "logger.log_every=4"]
    run(compose([*common, "dist/clock=mixed", "logger.progress=false", f"run_dir={tmp_path}"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["sim_time"] for r in records] == pytest.approx([1.6, 3.2], abs=0.01)
