"""Sharded replicas: m replicas of k ranks, FSDP2 inside each replica, the base algorithm and the outer step across.

The paper's worker is a node of 8 GPUs that averages its gradients at every step; at scale today each worker (a
*replica*) is k ranks that shard the model with FSDP, and SlowMo's (or DiLoCo's) outer step runs on each rank's own
shard against the rank holding the same shard index in every other replica (torchft with torchtitan, PrimeIntellect's
prime). Here world rank w = r k + j is shard j of replica r:

- inside replica r the model is ``fully_shard``-ed (FSDP2) over a mesh of its k ranks, its blocks then its root: the
  inner step is FSDP's own (all-gather of the parameters for the forward and backward passes, reduce-scatter of the
  mean gradient), the base optimizer steps on the local shards;
- the base algorithm and the outer step run on the ``cross`` group of the m ranks holding shard j, on that shard's
  values alone: every operation of Local SGD, SGP and Algorithm 1 is elementwise in theta (an average, a push-sum
  mix, u_{t+1} = beta u_t + Delta / gamma_t, x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}), so the k shards together
  take exactly the step the whole model would; only a norm over the whole model (the pseudo-gradient's clip) needs
  the replica, where the shards' squared norms are summed. x_{t,0} and u of a shard live on its rank: 2|theta|/k.
- AR-SGD over sharded replicas is HSDP: FSDP2 over the (m, k) mesh, replicate across replicas and shard inside.

Every rank's local shard (FSDP pads each parameter's dim 0 to a multiple of k) is moved into one flat buffer
(:class:`ShardedParameters`) that FSDP then all-gathers from and the base optimizer steps in: the algorithms work on
it in place, as on an unsharded model's :class:`~slowmo.flat.FlatParameters`, with no copy per step. That move sets
two fields of FSDP2's record of each parameter (``_sharded_param_data``, the DTensor's ``_local_tensor``), the ones
FSDP's own ``reset_sharded_param`` sets (tested here on torch 2.14; the parity tests fail if a version changes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import empty as distributed_empty

from .comm import Communicator
from .comm.torch_distributed import TorchDistributed
from .flat import PER_PARAMETER, FlatParameters, GradientMean, is_per_parameter, row_length


class ShardedReplicas:
    """The world of ``comm`` as m = world / ``size`` replicas of ``size`` ranks (consecutive world ranks): the (m, k)
    device mesh FSDP2 shards over (its ``shard`` dimension a replica, its ``replicate`` dimension the ranks of one
    shard index) and ``cross``, the latter as a communicator: the group the base algorithm and the outer step run on.

    Args:
        comm: the world, over ``torch.distributed`` (FSDP2 needs process groups: not the simulator).
        size: k, the ranks of a replica.
        device_type: "cpu" (gloo) or "cuda".
    """

    def __init__(self, comm: Communicator, size: int, device_type: str) -> None:
        if not isinstance(comm, TorchDistributed) or comm.group is not None:
            raise ValueError(
                "sharded replicas need torch.distributed's world (FSDP2 shards over its process groups): "
                "use dist.backend=gloo or nccl, not the simulator"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or comm.world_size % size:
            raise ValueError(
                f"dist.replica_size={size!r} does not divide the world of {comm.world_size} ranks into replicas; "
                "launch a multiple of replica_size ranks"
            )
        shape = (comm.world_size // size, size)  # (m, k)
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))
        self.cross = comm.of(self.mesh.get_group("replicate"), "")

    def shard(self, model: nn.Module, replicate: bool = False) -> nn.Module:
        """``model``, sharded inside the replica with FSDP2: each block (:func:`blocks`), then the root; with
        ``replicate``, HSDP over the whole mesh (FSDP2 then also averages the gradients across replicas)."""
        mesh: DeviceMesh = self.mesh if replicate else self.mesh["shard"]
        for block in blocks(model):  # (gathered again for the backward pass)
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)  # (the root's stay gathered until then)
        return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 gathers one at a time: the elements of the model's ``nn.ModuleList`` s (a Transformer's
    layers), or else the root's children that hold parameters (a ResNet's stages)."""
    listed = [m for module in model.modules() if isinstance(module, nn.ModuleList) for m in module]
    if listed:
        return [m for m in listed if any(True for _ in m.parameters())]
    return [child for child in model.children() if any(True for _ in child.parameters())]


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` are FSDP2's sharded parameters (DTensors)."""
    return any(isinstance(p, DTensor) for p in params)


class ShardedParameters(FlatParameters):
    """An FSDP2 model's local shards moved into one buffer, ``data``: each parameter's padded shard (FSDP pads dim 0
    to a multiple of k, with zeros that no parameter sees) becomes a view of it, and FSDP all-gathers from that view,
    so the base optimizer's steps and the outer step's writes are the model's. ``ranges`` are the padded shards';
    there is no flat gradient (FSDP's reduce-scattered gradients are its own DTensors)."""

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor], comm: TorchDistributed) -> None:
        """``comm``: the group the algorithm runs on (across replicas), whose counters the replica's bytes join."""
        managed = {id(fp.sharded_param): fp for fp in _fsdp_params(module)}
        missing = [i for i, p in enumerate(params) if id(p) not in managed]
        if missing:
            raise ValueError(
                f"parameters {missing[:5]} are not sharded by FSDP2 on this model; shard the whole model "
                "(ShardedReplicas.shard) before building the optimizer over it"
            )
        self.params = list(params)
        mesh: DeviceMesh = params[0].device_mesh
        self.gradients_averaged = mesh.ndim == 2  # HSDP: FSDP2 also averages the gradients across replicas
        self.replica = comm.of(mesh.get_group(mesh.ndim - 1), "replica/")
        self.whole_over = (self.replica,)
        self._inner = _inner_bytes(module, self.replica, comm)
        self._fsdp = [managed[id(p)] for p in params]
        sizes = [fp._sharded_param_data.numel() for fp in self._fsdp]
        self.numel = sum(sizes)
        self.whole_numel = sum(p.numel() for p in params)
        first = self._fsdp[0]._sharded_param_data
        self.data = torch.zeros(self.numel, dtype=first.dtype, device=first.device)
        self.grad = self.data.new_empty(0)
        self.grad_views = [None] * len(params)
        self.ranges, self._addresses, self.generation = [], [], 0
        self.rows = [row_length(fp.padded_sharded_param_size) for fp in self._fsdp]  # (contiguous shards)
        offset = 0
        with torch.no_grad():
            for fp, size in zip(self._fsdp, sizes, strict=True):
                slot = self.data[offset : offset + size]
                slot.copy_(fp._sharded_param_data)
                padded = slot.view(fp.padded_sharded_param_size)
                length = fp.sharded_param._local_tensor.size(0)
                fp._sharded_param_data = slot  # FSDP all-gathers from here
                fp.sharded_param._local_tensor = padded.narrow(0, 0, length)  # the optimizer steps in here
                self._addresses.append(slot.data_ptr())
                self.ranges.append((offset, offset + size))
                offset += size

    def owns(self, index: int) -> bool:
        return self._fsdp[index]._sharded_param_data.data_ptr() == self._addresses[index]

    def gradient_mean(self, comm: Communicator, bucket_mb: float) -> GradientMean | None:
        """None: the gradient mean over the replicas is HSDP's own (FSDP2 over the (m, k) mesh)."""
        if not self.gradients_averaged:
            raise ValueError(
                "an algorithm that averages gradients across replicas (AR-SGD, Local SGD's warm-up, "
                "procs_per_node) runs over sharded replicas as HSDP: shard with ShardedReplicas.shard(model, "
                "replicate=True) (AR-SGD), or set algorithm.warmup_steps=0 and procs_per_node=1"
            )
        return None

    def count_inner_step(self) -> None:
        """The bytes FSDP's collectives sent in the inner step just taken, counted under ``replica/`` (HSDP's across
        replicas as the algorithm's): logical bytes, by the formula of :func:`_inner_bytes`."""
        for group, kind, nbytes in self._inner:
            group.record(kind, nbytes)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.generation += 1

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the replica's mean gradient by min(1, max_norm / (||g||_2 + 1e-6)), the norm over the whole model
        (the shards' squares summed inside the replica); returns ||g||_2."""
        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        square = torch.stack([g.pow(2).sum() for g in grads]).sum().reshape(1) if grads else self.data.new_zeros(1)
        norm = self.replica.all_reduce(square).sqrt()
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(factor)
        return norm.reshape(())

    def per_parameter(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with each tensor in this buffer's layout (x_{t,0}, u: one value per local shard's element) as one
        DTensor per parameter, laid out as the parameter (so that a checkpoint of it can be loaded with another k)."""

        def convert(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: convert(v) for key, v in value.items()}
            return self._distributed(value) if self._flat_layout(value) else value

        return convert(state)

    def flat_layout(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`per_parameter`."""

        def convert(value: Any) -> Any:
            if is_per_parameter(value):
                return self._flattened(value)
            return {key: convert(v) for key, v in value.items()} if isinstance(value, dict) else value

        return convert(state)

    def _flat_layout(self, value: Any) -> bool:
        return torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.numel

    def _distributed(self, flat: torch.Tensor) -> dict[str, list[DTensor]]:
        pieces = []
        for p, fp, (a, b) in zip(self.params, self._fsdp, self.ranges, strict=True):
            shard = flat[a:b].view(fp.padded_sharded_param_size).narrow(0, 0, local(p).shape[0])
            pieces.append(DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()))
        return {PER_PARAMETER: pieces}

    def _flattened(self, value: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        flat = self.data.new_zeros(self.numel)
        for piece, fp, (a, b) in zip(value[PER_PARAMETER], self._fsdp, self.ranges, strict=True):
            shard = local(piece)
            flat[a:b].view(fp.padded_sharded_param_size).narrow(0, 0, shard.shape[0]).copy_(shard)
        return flat

    def whole(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole parameters whose local shards (unpadded, model order) are ``shards``: an all-gather inside the
        replica."""
        return [
            DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            for s, p in zip(shards, self.params, strict=True)
        ]


def _inner_bytes(module: nn.Module, replica: Communicator, across: Communicator) -> list[tuple[Communicator, str, int]]:
    """Bytes one rank sends in one inner step through FSDP2's own collectives, by kind, as slowmo.comm counts its
    collectives (ring algorithms, logical bytes: gloo's reduce-scatter is an all-reduce underneath). For each unit of
    P elements (its parameters' padded shards times k): an all-gather of P for the forward pass and, but for the root
    (:meth:`ShardedReplicas.shard` keeps its parameters gathered until then), again for the backward pass, each
    (k - 1)/k 4P bytes for float32; a reduce-scatter of the gradients, (k - 1)/k 4P; under HSDP an all-reduce of the
    shard across the m replicas, 2 (m - 1)/m 4P/k (counted on ``across``: AR-SGD's gradient all-reduce)."""
    out: dict[tuple[Communicator, str], int] = {}
    for sub, params in _units(module):
        if not params:
            continue
        mesh: DeviceMesh = params[0].sharded_param.device_mesh
        k = mesh.size(mesh.ndim - 1)
        shard = sum(fp._sharded_param_data.numel() * fp._sharded_param_data.element_size() for fp in params)
        gathers = 1 if sub is module else 2
        sent = {(replica, "all_gather"): gathers * (k - 1) * shard, (replica, "reduce_scatter"): (k - 1) * shard}
        if mesh.ndim == 2:
            sent[(across, "all_reduce")] = 2 * (mesh.size(0) - 1) * shard // mesh.size(0)
        for key, nbytes in sent.items():
            out[key] = out.get(key, 0) + nbytes
    return [(group, kind, nbytes) for (group, kind), nbytes in out.items()]


def _units(module: nn.Module) -> list[tuple[nn.Module, list]]:
    """FSDP2's units of ``module``: each sharded module and its records of the parameters it gathers."""
    out = []
    for sub in module.modules():
        state = sub._get_fsdp_state() if hasattr(sub, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        if group is not None:
            out.append((sub, group.fsdp_params))
    return out


def _fsdp_params(module: nn.Module) -> list:
    """FSDP2's records of the sharded parameters of ``module`` and its submodules."""
    return [fp for _, params in _units(module) for fp in params]


SHARDED = "dcp"  # the key of a checkpoint's marker of a tensor saved with torch.distributed.checkpoint


def split_sharded(state: Any, path: str = "") -> tuple[dict[str, DTensor], Any]:
    """``state`` (nested dicts and lists) cut in two: its DTensors, by path, for ``torch.distributed.checkpoint``
    (sharded files that can be loaded with another k), and the rest, each DTensor replaced by a marker of plain data
    (its path, global shape and dtype) that one rank's file holds. A path starts with the replica's index: the
    replicas' models differ between outer steps, and DCP would keep one copy of a tensor saved under one name."""
    tensors: dict[str, DTensor] = {}

    def walk(node: Any, at: str) -> Any:
        if isinstance(node, DTensor):
            at = f"replica{torch.distributed.get_rank() // node.device_mesh.size(node.device_mesh.ndim - 1)}{at}"
            tensors[at] = node
            return {SHARDED: at, "shape": list(node.shape), "dtype": str(node.dtype).removeprefix("torch.")}
        if isinstance(node, dict):
            return {key: walk(value, f"{at}/{key}") for key, value in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(walk(value, f"{at}/{i}") for i, value in enumerate(node))
        return node

    return tensors, walk(state, path)


def join_sharded(rest: Any, directory: Path, like: torch.Tensor) -> Any:
    """The inverse of :func:`split_sharded`: each marker of ``rest`` becomes the DTensor loaded from ``directory``
    (``torch.distributed.checkpoint``, every rank at once), laid out as ``like`` is (this run's mesh and placements:
    the checkpoint's own, or another k's, which DCP reshards to)."""
    targets: dict[str, DTensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict) and SHARDED in node:
            shape, dtype = node["shape"], getattr(torch, node["dtype"])
            target = (
                distributed_empty(shape, dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)
                if isinstance(like, DTensor)
                else torch.empty(shape, dtype=dtype, device=like.device)  # (whole copies: k = 1)
            )
            targets[node[SHARDED]] = target
            return target
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(walk(value) for value in node)
        return node

    state = walk(rest)
    if targets:
        dcp.load(targets, checkpoint_id=str(directory))
    return state


def load_model_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's model state back into ``model``, whole or sharded (each rank's shards into its own, in place)."""
    targets = model.state_dict()
    if not any(isinstance(t, DTensor) for t in targets.values()):
        model.load_state_dict(state)
        return
    if set(targets) != set(state):
        raise ValueError(
            f"the checkpoint's model has entries {sorted(set(state) ^ set(targets))[:5]} that this model has not, or "
            "the reverse; resume with the same model"
        )
    with torch.no_grad():
        for name, target in targets.items():
            local(target).copy_(local(state[name]))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of it), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
