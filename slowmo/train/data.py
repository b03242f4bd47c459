"""The input pipeline: each rank's batches through a ``torch.utils.data.DataLoader``, onto the rank's device.

- A rank's batches of an epoch are the task's lists of dataset indices (``Task.train_batches``); the loader starts
  at any position of the epoch, and the batches before it are never loaded (a resumed run skips them for free).
- Random augmentation is seeded per sample from (seed, epoch, sample index) by :class:`Seeded`, never from a
  worker's or the process's random state: a sample looks the same whatever ``data.num_workers`` is, whichever
  worker loads it and wherever a run was resumed, so those choices do not change a run's parameters.
- ``data.num_workers`` worker processes, kept alive across epochs, each loading ``data.prefetch_factor`` batches
  ahead; pinned host memory when the device is a GPU, and :func:`on_device` copies batch k+1 to the GPU on a side
  stream while step k computes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK = (1 << 64) - 1
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample of one epoch: splitmix64's finaliser over (seed, epoch, index), so that nearby
    triples give unrelated random streams."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0xABC98388FB8FAC03 + 1) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Seeded(Dataset):
    """``dataset[index]`` loaded under torch's global random stream seeded with ``sample_seed(seed, epoch, index)``
    (the stream torchvision's random transforms draw from), which is restored afterwards. Keys are (epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class EpochBatches(Sampler):
    """The batch sampler of a rank's training loader: the batches of epoch ``epoch`` from position ``start`` on, as
    lists of (epoch, index) keys for :class:`Seeded`. Set with :meth:`set_epoch` before each pass over the loader."""

    def __init__(self, batches_of: Callable[[int], list[list[int]]]) -> None:
        self._batches_of = batches_of
        self.epoch, self.start = 0, 0
        self.batches: list[list[int]] = batches_of(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if epoch != self.epoch:
            self.batches = self._batches_of(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches[self.start :]:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


def loader(
    dataset: Dataset,
    batch_sampler: Iterable[list],
    collate: Callable[[list], Any],
    num_workers: int,
    prefetch_factor: int,
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader over ``batch_sampler``'s batches; its workers persist across passes.

    Workers are forked where the platform can (Linux), as DataLoader does by default there: they start at once and
    share the parent's dataset, and a rank started by ``spawn`` (which would make spawning the default) need not
    pickle it. Workers never touch the GPU."""
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        multiprocessing_context=_FORK if workers else None,
        generator=torch.Generator(),
    )  # its own: creating an iterator draws nothing from torch's stream


def close(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent workers now (rather than whenever the garbage collector gets to it)."""
    iterator = loader._iterator  # DataLoader keeps the iterator of persistent workers here; it has no public close
    loader._iterator = None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def to_device(batch: Any, device: torch.device, channels_last: bool = False, non_blocking: bool = False) -> Any:
    """``batch`` (tensors in tuples, lists and dicts; anything else is left as it is) on ``device``; 4-D floating
    point tensors (images) in channels-last memory format when ``channels_last``."""
    if torch.is_tensor(batch):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: to_device(value, device, channels_last, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, channels_last, non_blocking) for value in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(batch):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def on_device(batches: Iterable[Any], device: torch.device, channels_last: bool = False) -> Iterator[Any]:
    """``batches`` moved to ``device``. On a GPU, the copy of the next batch (from pinned memory, non-blocking) is
    issued on a side stream before the current batch is handed out, so it overlaps the current step's compute."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device, channels_last)
        return
    stream, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(batch: Any) -> Any:
        with torch.cuda.stream(stream):
            return to_device(batch, device, channels_last, non_blocking=True)

    source = iter(batches)
    ahead = next(source, None)
    ahead = None if ahead is None else issue(ahead)
    while ahead is not None:
        compute.wait_stream(stream)
        current = ahead
        for tensor in _tensors(current):
            tensor.record_stream(compute)  # its memory is not reused until the step that reads it is done
        following = next(source, None)
        ahead = None if following is None else issue(following)
        yield current
