"""The input pipeline: DataLoader workers do not change a run, resume needs no replay of skipped samples, and
augmentation is seeded per sample from (seed, epoch, index) alone. (Kill -9 and a bit-exact resume with workers:
test_crash_resume.py.)"""

import multiprocessing

import torch
from torch.utils.data import Dataset

from slowmo.tasks.cifar10 import write_batches
from slowmo.train import data, run


def cifar_cfg(run_dir, root, **sections):
    base = {
        "run_dir": str(run_dir),
        "task": {"name": "cifar10"},
        "model": {"name": "resnet20", "width": 4},
        "data": {"root": str(root), "verify_checksums": False, "batch_size": 8, "augment": True},
        "logger": {"progress": False, "log_every": 4},
        "train": {"max_steps": 12, "eval_every": 6},
        "dist": {"backend": "gloo", "world_size": 2},
        "algorithm": {"name": "localsgd", "period": 2},
        "slowmo": {"enabled": True, "tau": 4, "update": {"beta": 0.5}},
        "optimizer": {"lr": 0.05},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def final(run_dir):
    return torch.load(run_dir / "final.pt")["model"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_workers_do_not_change_the_run_and_augmentation_is_on(tmp_path):
    root = write_batches(tmp_path / "cifar", 16)  # 80 images: 5 steps per epoch on 2 ranks of 8
    for name, workers, augment in (("w0", 0, True), ("w2", 2, True), ("plain", 0, False)):
        summary = run(cifar_cfg(tmp_path / name, root, data={"num_workers": workers, "augment": augment}))
        assert summary["steps"] == 12 and summary["device"] == "cpu"
    assert same(final(tmp_path / "w0"), final(tmp_path / "w2"))  # 2.4 epochs: across epoch boundaries
    assert not same(final(tmp_path / "w0"), final(tmp_path / "plain"))  # the augmentation did something


class Counting(Dataset):
    """Index i is the sample; every load is recorded."""

    def __init__(self, n):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.loaded.append(index)
        return torch.rand(()), index  # a draw from torch's stream: what augmentation does


def test_a_loader_started_mid_epoch_loads_only_what_follows_and_draws_per_sample():
    dataset = Counting(12)
    batches = [[3, 1, 7], [0, 11, 5], [2, 9, 4]]
    sampler = data.EpochBatches(lambda epoch: batches if epoch == 0 else batches[::-1])
    loader = data.loader(data.Seeded(dataset, seed=5), sampler, lambda items: items, 0, 2, False)
    full = list(loader)
    assert dataset.loaded == [3, 1, 7, 0, 11, 5, 2, 9, 4]
    dataset.loaded.clear()
    before = torch.get_rng_state()
    sampler.set_epoch(0, start=2)
    tail = list(loader)
    assert dataset.loaded == [2, 9, 4]  # the first two batches were never loaded
    assert tail == full[2:]  # the same draws for the same samples
    assert torch.equal(torch.get_rng_state(), before)  # torch's stream is left as it was
    sampler.set_epoch(1)
    other = {index: value for batch in loader for value, index in batch}
    again = {index: value for batch in full for value, index in batch}
    assert all(other[i] != again[i] for i in again)  # a new epoch: new draws for every sample
    expected = {}
    for index in again:  # each draw is the first of a stream seeded from (seed, epoch, index) alone
        generator = torch.Generator().manual_seed(data.sample_seed(5, 0, index))
        expected[index] = torch.rand((), generator=generator)
    assert all(torch.equal(again[i], expected[i]) for i in again)


def test_sample_seeds_differ_for_nearby_triples():
    seeds = {data.sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(100)}
    assert len(seeds) == 900 and all(0 <= x < 2**64 for x in seeds)


def test_workers_are_stopped_when_the_run_ends(tmp_path):
    """Simulated ranks live in this process, so their loaders' workers are its children: none outlives the run."""
    root = write_batches(tmp_path / "cifar", 16)
    run(
        cifar_cfg(
            tmp_path / "run",
            root,
            dist={"backend": "simulated"},
            data={"num_workers": 2},
            train={"max_steps": 3, "eval_every": 2},
        )
    )
    assert multiprocessing.active_children() == []
