"""Mixed precision (``train.precision``): autocast for the forward pass and the loss; parameters, gradients, the base
optimizer's state and SlowMo's state (u, x_{t,0}) stay fp32.

- ``fp32``: no autocast.
- ``bf16``: autocast to bfloat16 (same exponent range as fp32: no loss scaling).
- ``fp16``: autocast to float16 with a dynamic loss scale (``torch.amp.GradScaler``): the loss is multiplied by the
  scale S before backward, the gradients divided by S before the step, and S is halved after an overflow (an inf or
  NaN in the gradients) and doubled after 2,000 clean steps. Whether a step overflowed is **agreed by all ranks**
  (one all-reduce of a flag per step, counted as control traffic, ``control/all_reduce``): if any rank overflowed,
  every rank skips that step, so the ranks keep issuing the same collectives and keep the same scale.

What a skipped step is: **not an inner step**. No rank's base optimizer steps, the base algorithm sends nothing
(no gradient mean, no gossip, no Local SGD average) and the inner step counter k stays where it was, so the next
applied step is the same inner step k: same gossip peers, same place in SlowMo's outer iteration, which always
holds tau applied inner steps. The batch is consumed and the loop's step advances (it drives the lr schedule,
logging, checkpoints and ``train.max_steps``). The scaler's state is part of every checkpoint.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..comm import Communicator
from ..inner import DistributedOptimizer

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The forward pass's autocast and, for fp16, the agreed loss scaling around ``backward`` and ``opt.step``."""

    def __init__(
        self, name: str, device: torch.device, comm: Communicator, clip_grad_norm: float | None = None
    ) -> None:
        self.name, self.device, self.comm, self.clip_grad_norm = name, device, comm, clip_grad_norm
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self.skipped = 0  # steps skipped for an overflow, over the whole run

    def autocast(self) -> AbstractContextManager:
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, opt: DistributedOptimizer) -> bool:
        """Backward, the gradient clipped to ``clip_grad_norm`` (if set), then the inner step unless some rank's
        gradients overflowed; True if the step was taken."""
        if self.scaler is None:
            loss.backward()
            if self.clip_grad_norm is not None:
                opt.clip_grad_norm_(self.clip_grad_norm)
            opt.step()
            return True
        self.scaler.scale(loss).backward()
        opt.wait_gradients()  # gradient means started during backward end before the gradients are unscaled
        self.scaler.unscale_(opt)  # the gradients at their true scale; their inf/NaN check is recorded per device
        found = self.scaler._found_inf_per_device(opt)  # GradScaler's record, read by its step() and update()
        flag = torch.zeros(1, device=self.device)
        for value in found.values():
            flag += value.to(self.device)
        with self.comm.control():
            self.comm.all_reduce(flag)
        for value in found.values():  # every rank now skips, and backs off its scale, on the same steps
            value.copy_(flag[0])
        taken = flag.item() == 0
        if taken and self.clip_grad_norm is not None:
            opt.clip_grad_norm_(self.clip_grad_norm)  # on the unscaled gradients
        self.scaler.step(opt)  # calls opt.step() only when taken
        self.scaler.update()
        self.skipped += not taken
        return taken

    @property
    def scale(self) -> float | None:
        return None if self.scaler is None else self.scaler.get_scale()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": None if self.scaler is None else self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state["skipped"]
