"""Flat storage: the model's parameters and gradients as views of one contiguous buffer each, so that all-reduce,
gossip, averaging and the outer step work on the buffer in place (no copy per step), while the model and the base
optimizer see ordinary parameters (as fairscale's and apex's flat parameters, DDP's gradient bucket views).

:class:`FlatParameters` owns the two buffers; :class:`GradientMean` averages the gradient buffer over a group of
ranks in buckets launched from per-parameter hooks during the backward pass, overlapping communication with it.
:func:`flatten` / :func:`average_` remain for the small lists that are not stored flat (floating-point buffers such
as BatchNorm statistics, optimizer state).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .comm import Communicator
from .comm.base import Work

PER_PARAMETER = "per_parameter"  # a checkpoint's outer state, one tensor per parameter (sharded replicas)


def is_per_parameter(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {PER_PARAMETER}


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D copy of ``tensors``, in order."""
    if not tensors:
        return torch.empty(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (inverse of :func:`flatten`)."""
    offset = 0
    for t in tensors:
        t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_(comm: Communicator, tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its mean over the ranks of ``comm`` (one all-reduce of a flat copy)."""
    if tensors:
        flat = flatten(tensors)
        comm.all_reduce(flat, "mean")
        unflatten_(flat, tensors)


def row_length(shape: Sequence[int], stride: Sequence[int] | None = None) -> int:
    """The values of one row of a tensor laid out as ``shape`` and ``stride`` (None: contiguous), as a row-wise code
    scales them: a slice along dim 0 where it lies in one run of memory (row-major, channels-last), else one value."""
    if len(shape) < 2 or not shape[0]:
        return 1
    row = math.prod(shape) // shape[0]
    return row if stride is None or stride[0] == row else 1


class FlatParameters:
    """``params`` moved into one buffer, ``data``, and given gradients that are views of another, ``grad``.

    Each parameter becomes a view of ``data`` with its own strides (a channels-last weight stays channels-last), so
    the buffer holds the parameters in memory order, the same on every rank; ``data[:numel]`` is all of them and
    ``ranges`` says where each one lies. The buffers are padded with zeros to a multiple of ``multiple`` elements
    (the ranks, for a sharded outer state), which no parameter sees. The gradient views stay in place for the whole
    run (:meth:`zero_grad` zeroes them); a gradient that user code replaced (``p.grad = ...``, or ``None`` then a
    backward pass) is copied back into its view by :meth:`attach_grads`, which every step calls.
    """

    whole_over: tuple[Communicator, ...] = ()  # groups whose ranks hold the rest of each parameter (none: it is whole)
    gradients_averaged = False  # whether the backward pass itself averages the gradients across replicas (HSDP)

    def __init__(self, params: Sequence[torch.Tensor], multiple: int = 1) -> None:
        first = params[0]
        self.params = list(params)
        self.numel = sum(p.numel() for p in params)
        self.whole_numel = self.numel  # the parameters' values on all ranks holding parts of them (here: this one)
        size = -(-self.numel // multiple) * multiple
        self.data = torch.zeros(size, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self.ranges: list[tuple[int, int]] = []
        self.rows = [row_length(p.shape, p.stride()) for p in params]  # each parameter's row length (a row-wise code's)
        self.grad_views: list[torch.Tensor | None] = []
        self._addresses: list[int] = []  # where each parameter's view starts: owns() compares
        self.generation = 0  # counts what brings new gradients: zero_grad, replaced gradients, backward (GradientMean)
        offset = 0
        with torch.no_grad():
            for p in params:
                view = self.data.as_strided(p.shape, p.stride(), offset)
                view.copy_(p)
                p.data = view
                self._addresses.append(view.data_ptr())
                grad = self.grad.as_strided(p.shape, p.stride(), offset) if p.requires_grad else None
                p.grad = grad
                self.grad_views.append(grad)
                self.ranges.append((offset, offset + p.numel()))
                offset += p.numel()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient g by min(1, max_norm / (||g||_2 + 1e-6)) in place; returns ||g||_2."""
        norm = torch.linalg.vector_norm(self.grad)
        self.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def count_inner_step(self) -> None:
        """Count the bytes sent by collectives that run outside slowmo's communicators in an inner step (none here)."""

    def per_parameter(self, state: dict[str, Any]) -> dict[str, Any]:
        """A part's ``state`` as a checkpoint holds it: here as it is (sharded replicas: per parameter)."""
        return state

    def flat_layout(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`per_parameter`; a state of sharded replicas' per parameter (their checkpoint, loaded
        into whole copies) into this buffer's layout."""

        def convert(value: Any) -> Any:
            if is_per_parameter(value):
                flat = self.data.new_zeros(self.data.numel())
                for piece, p, (a, _) in zip(value[PER_PARAMETER], self.params, self.ranges, strict=True):
                    flat.as_strided(p.shape, p.stride(), a).copy_(piece)
                return flat
            return {key: convert(v) for key, v in value.items()} if isinstance(value, dict) else value

        return convert(state)

    def whole(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole parameters of which ``shards`` (one per parameter, model order) are this rank's parts."""
        return shards

    def averaged_inside(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """``buffers`` averaged over the ranks holding the other parts of the model too (:attr:`whole_over`; none for
        a whole model)."""
        for comm in self.whole_over:
            average_(comm, buffers)
        return buffers

    def gradient_mean(self, comm: Communicator, bucket_mb: float) -> GradientMean | None:
        """The mean of the gradient buffer over ``comm`` at every step (:class:`GradientMean`)."""
        return GradientMean(comm, self, bucket_mb)

    def owns(self, index: int) -> bool:
        """Whether parameter ``index`` still lives in this buffer: False once a newer FlatParameters took it over (a
        second optimizer built over the same model) or the model was moved."""
        return self.params[index].data_ptr() == self._addresses[index]

    @property
    def values(self) -> torch.Tensor:
        """The parameters' values, flat (``data`` without its padding)."""
        return self.data[: self.numel]

    def zero_grad(self) -> None:
        self.grad.zero_()
        self.generation += 1

    @torch.no_grad()
    def attach_grad(self, index: int) -> None:
        """Parameter ``index``'s gradient back in its view of ``grad`` (a copy, if it was replaced; zeros if None)."""
        p, view = self.params[index], self.grad_views[index]
        if view is None or p.grad is view:
            return
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad)
        p.grad = view
        self.generation += 1

    def attach_grads(self) -> None:
        for index in range(len(self.params)):
            self.attach_grad(index)

    def runs(self, value_of: Sequence[float]) -> list[tuple[int, int, float]]:
        """Maximal ranges of consecutive parameters sharing a value (``value_of[i]`` for parameter i, e.g. its
        param group's lr), as (start, end, value): the outer step then works on a few slices with a scalar each."""
        runs: list[tuple[int, int, float]] = []
        for (start, end), value in zip(self.ranges, value_of, strict=True):
            if runs and runs[-1][2] == value and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end, value)
            else:
                runs.append((start, end, value))
        return runs


class GradientMean:
    """The mean of the flat gradient over the ranks of ``comm``, in buckets of about ``bucket_mb`` MB.

    Buckets are consecutive parameters in reverse order (the order backward produces their gradients, as DDP's).
    On a communicator that overlaps, a post-accumulate-grad hook counts each bucket's gradients and, once the bucket
    is complete and every earlier bucket launched (so all ranks issue the same collectives in the same order), starts
    its asynchronous all-reduce while the backward pass goes on; :meth:`wait` launches what is left, waits for all
    and divides by the ranks. Elsewhere (the simulator) every bucket is reduced in :meth:`wait`. One backward pass
    per step: a parameter whose gradient was not computed contributes its zero gradient.

    :meth:`wait` averages once per set of gradients, however they came: each of them moves
    :attr:`FlatParameters.generation` on (a backward pass through the hooks, whether the gradients were zeroed by
    the optimizer, by the model or set to None; gradients assigned by hand, found replaced; ``zero_grad``); a second
    call with nothing new does nothing.

    The hooks live as long as this object (the optimizer that holds it) and only while :class:`FlatParameters` still
    holds the parameters: they are removed when it is dropped (garbage-collected), and remove themselves the first
    time they fire after a newer optimizer took the parameters over, so a replaced optimizer never sends a byte or
    touches a gradient again.

    :attr:`enabled` (True) is the switch of the hooks: while False they launch nothing (they still record that new
    gradients came), so a backward pass sends no bytes; set it between steps only (LocalSGD's warm-up turns the
    gradient mean over all ranks off after its last warm-up step). :meth:`wait` still averages if called.
    """

    def __init__(self, comm: Communicator, flat: FlatParameters, bucket_mb: float = 25.0) -> None:
        self.comm, self.flat = comm, flat
        self.enabled = True
        cap = max(1, int(bucket_mb * 2**20) // flat.grad.element_size())
        self.buckets: list[tuple[int, int]] = []  # (start, end) in the flat gradient, in launch order
        self._bucket_of: dict[int, int] = {}  # parameter index -> bucket
        end = None
        for index in reversed(range(len(flat.params))):
            start, stop = flat.ranges[index]
            if end is None or end - start > cap:
                self.buckets.append((start, stop))
                end = stop
            else:
                self.buckets[-1] = (start, end)
            self._bucket_of[index] = len(self.buckets) - 1
        self._size = [0] * len(self.buckets)
        for index, bucket in self._bucket_of.items():
            self._size[bucket] += flat.params[index].requires_grad
        self._reset()
        self._generation = -1  # the FlatParameters.generation last averaged
        self._handles: list[RemovableHandle] = []
        if comm.world_size > 1:
            me = weakref.ref(self)  # the hooks must not keep a dropped optimizer alive
            for index, p in enumerate(flat.params):
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(_hook, me, index)))
            weakref.finalize(self, _remove, self._handles)

    def _reset(self) -> None:
        self._pending = [0] * len(self.buckets)
        self._launched = 0
        self._works: list[Work] = []

    def remove(self) -> None:
        """Remove the hooks: the backward pass no longer launches this mean's collectives."""
        _remove(self._handles)

    def _ready(self, index: int) -> None:
        if not self.flat.owns(index):  # a newer optimizer holds the parameters now: this one is done
            self.remove()
            return
        self.flat.generation += 1  # backward brought new gradients
        self.flat.attach_grad(index)
        if not self.comm.overlaps or not self.enabled:
            return
        bucket = self._bucket_of[index]
        self._pending[bucket] += 1
        while self._launched < len(self.buckets) and self._pending[self._launched] == self._size[self._launched]:
            self._launch()

    def _launch(self) -> None:
        start, end = self.buckets[self._launched]
        self._works.append(self.comm.all_reduce_async(self.flat.grad[start:end]))
        self._launched += 1

    def wait(self) -> None:
        """Every bucket reduced and divided by the ranks: the flat gradient is the mean (once per set of gradients:
        a second call with nothing new does nothing)."""
        self.flat.attach_grads()
        if self._generation == self.flat.generation:
            return
        self._generation = self.flat.generation
        while self._launched < len(self.buckets):
            self._launch()
        for work in self._works:
            work.wait()
        if self.comm.world_size > 1:
            self.flat.grad.div_(self.comm.world_size)
        self._reset()


def _hook(mean: weakref.ref[GradientMean], index: int, _: torch.Tensor) -> None:
    """A post-accumulate-grad hook of ``mean`` (while it lives) for parameter ``index``."""
    alive = mean()
    if alive is not None:
        alive._ready(index)


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
