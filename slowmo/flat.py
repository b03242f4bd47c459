"""Flat buffers: many tensors as one contiguous 1-D buffer, so that a collective moves them in one call."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .comm import Communicator


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
    """In place: every tensor becomes its mean over the ranks of ``comm`` (one all-reduce of a flat buffer)."""
    if tensors:
        flat = flatten(tensors)
        comm.all_reduce(flat, "mean")
        unflatten_(flat, tensors)


def gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the trainable ``params``; a missing gradient becomes zeros, so every rank reduces the
    same buffer (a parameter unused on one rank contributes 0 to the mean, as in DDP)."""
    grads = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    return grads


def per_element(tensors: Sequence[torch.Tensor], values: Sequence[float]) -> torch.Tensor:
    """One value per tensor, repeated over its elements: a vector laid out as :func:`flatten` lays out ``tensors``."""
    first = tensors[0]
    return torch.cat(
        [
            torch.full((t.numel(),), value, dtype=first.dtype, device=first.device)
            for t, value in zip(tensors, values, strict=True)
        ]
    )
