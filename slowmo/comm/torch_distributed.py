"""The real backend: ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every blocking call has a deadline: collectives use the process group's timeout, and point-to-point waits use
this communicator's ``timeout``, so a dead or stuck peer gives a :class:`CommError` naming it instead of a hang.

gloo with GPU tensors (several ranks sharing a machine's GPUs, e.g. one GPU in a test) goes through host copies:
each operation copies its GPU buffers to the CPU, runs on gloo and copies the result back, which gloo's own CUDA
paths do too, and which also covers the operations that gloo supports only on CPU tensors (point to point).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable

import torch
import torch.distributed as dist

from .base import CommError, Communicator, Work

# torch 2.14 renames the flat collectives (the old names warn); torch 2.11 has only the old ones
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class TorchDistributed(Communicator):
    """A communicator over a ``torch.distributed`` process group (the default group unless ``group`` is given).

    Args:
        group: the process group; None for the world.
        timeout: seconds a point-to-point receive may wait before raising (collectives use the group's).
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, timeout: float = 300.0, label: str = "", counter=None
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributed needs an initialised process group: call "
                "slowmo.comm.launch.init_distributed() (or torch.distributed.init_process_group) first"
            )
        super().__init__(dist.get_rank(group), dist.get_world_size(group), label, counter)
        self.group = group
        self.timeout = timeout
        self._global = dist.get_process_group_ranks(group) if group is not None else list(range(self.world_size))
        self._device_type = "cpu" if dist.get_backend(group) == "gloo" else "cuda"  # what the backend moves
        self.overlaps = True

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """The buffer the backend works on: ``tensor`` itself, or its copy where the backend moves tensors (gloo, a
        GPU tensor: the host; NCCL, a host tensor such as an outer state in host memory: the GPU)."""
        if tensor.device.type == self._device_type:
            return tensor
        return tensor.cpu() if self._device_type == "cpu" else tensor.cuda()

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        buffer = self._staged(tensor)
        self._guard(lambda: dist.all_reduce(buffer, group=self.group), "all_reduce")
        _copy_back(tensor, buffer)

    def _all_reduce_async(self, tensor: torch.Tensor) -> Work:
        buffer = self._staged(tensor)
        try:
            work = dist.all_reduce(buffer, group=self.group, async_op=True)
        except RuntimeError as error:
            raise CommError(
                f"rank {dist.get_rank()}: all_reduce failed (a peer died or timed out): {reason(error)}"
            ) from error
        return _Timed(
            work, self, "all_reduce", keep=buffer, then=None if buffer is tensor else lambda: tensor.copy_(buffer)
        )

    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None:
        out, inp = self._staged(output), self._staged(input)
        self._guard(lambda: _REDUCE_SCATTER(out, inp, group=self.group), "reduce_scatter")
        _copy_back(output, out)

    def _all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        out, inp = self._staged(output), self._staged(input)
        self._guard(lambda: _ALL_GATHER(out, inp, group=self.group), "all_gather")
        _copy_back(output, out)

    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        out, inp = self._staged(output), self._staged(input)
        self._guard(lambda: dist.all_to_all_single(out, inp, group=self.group), "all_to_all")
        _copy_back(output, out)

    def _all_to_all_async(self, output: torch.Tensor, input: torch.Tensor) -> Work:
        out, inp = self._staged(output), self._staged(input)
        try:
            work = dist.all_to_all_single(out, inp, group=self.group, async_op=True)
        except RuntimeError as error:
            raise CommError(
                f"rank {dist.get_rank()}: all_to_all failed (a peer died or timed out): {reason(error)}"
            ) from error
        return _Timed(work, self, "all_to_all", keep=inp, then=None if out is output else lambda: output.copy_(out))

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        buffer = self._staged(tensor)
        self._guard(lambda: dist.broadcast(buffer, src=self._global[src], group=self.group), "broadcast")
        _copy_back(tensor, buffer)

    def _barrier(self) -> None:
        self._guard(lambda: dist.barrier(group=self.group), "barrier")

    def _isend(self, tensor: torch.Tensor, dst: int) -> Work:
        buffer = self._staged(tensor)  # a copy is taken now: the tensor may change once this returns
        work = dist.isend(buffer, dst=self._global[dst], group=self.group)
        return _Timed(work, self, f"send to rank {self._global[dst]}", keep=buffer)

    def _irecv(self, tensor: torch.Tensor, src: int) -> Work:
        buffer = self._staged(tensor)
        work = dist.irecv(buffer, src=self._global[src], group=self.group)
        return _Timed(
            work,
            self,
            f"recv from rank {self._global[src]}",
            keep=buffer,
            then=None if buffer is tensor else lambda: tensor.copy_(buffer),
        )

    def of(self, group: dist.ProcessGroup, label: str) -> TorchDistributed:
        """A communicator over ``group`` (made by every rank, e.g. a device mesh's), counting its bytes with this one's
        under ``label``."""
        return TorchDistributed(group, self.timeout, self.label + label, self._bytes)

    def _new_group(self, partition: list[list[int]], label: str) -> Communicator:
        mine = None
        for group_ranks in partition:  # every rank creates every group, in the same order
            group = dist.new_group([self._global[r] for r in group_ranks])
            if self.rank in group_ranks:
                mine = group
        return TorchDistributed(mine, self.timeout, self.label + label, self._bytes)

    def _guard(self, call, what: str) -> None:
        try:
            call()
        except RuntimeError as error:
            raise CommError(
                f"rank {dist.get_rank()}: {what} failed (a peer died or timed out): {reason(error)}"
            ) from error


def _copy_back(tensor: torch.Tensor, buffer: torch.Tensor) -> None:
    if buffer is not tensor:
        tensor.copy_(buffer)


class _Timed:
    """Wraps a torch Work so that ``wait()`` gives up after the communicator's timeout; ``keep`` holds the buffer the
    backend reads or writes until then, and ``then`` runs once the operation is complete (a host copy's way back)."""

    def __init__(
        self, work, comm: TorchDistributed, what: str, keep: torch.Tensor, then: Callable[[], object] | None = None
    ) -> None:
        self._work, self._comm, self._what, self._keep, self._then = work, comm, what, keep, then

    def wait(self) -> None:
        if self._work is None:
            return
        try:
            self._work.wait(datetime.timedelta(seconds=self._comm.timeout))
        except RuntimeError as error:
            raise CommError(
                f"rank {dist.get_rank()}: {self._what} failed (the peer died, or sent nothing "
                f"within {self._comm.timeout:g}s): {reason(error)}"
            ) from error
        if self._then is not None:
            self._then()
        self._work = self._keep = self._then = None


def reason(error: Exception) -> str:
    """The gist of a backend error: its first line without the C++ source location and the boilerplate advice."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\[[^\]]*\] ", "", first).split(". This is typically")[0]
