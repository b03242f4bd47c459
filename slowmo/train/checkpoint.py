"""Checkpoints: one file per rank in ``<run_dir>/checkpoints/step_<k>/``, each written atomically (temporary file,
fsync, rename), with a version and a checksum; a checkpoint counts only once rank 0 has written ``COMPLETE`` after
every rank's file. Loading skips a truncated, corrupt or foreign checkpoint for the previous valid one, and says which
it skipped and why; the last ``keep`` checkpoints are kept. A sharded model's tensors (sharded replicas: its
parameters, the base optimizer's state, x_{t,0} and u, all DTensors) go to ``torch.distributed.checkpoint``'s files in
``dcp/`` beside the ranks' files, which hold a marker of each; DCP loads them into this run's layout (another k's too).

A checkpoint holds tensors and plain data (dicts, lists, numbers, strings) only, and is read with
``torch.load(weights_only=True)``: a file that holds any other pickled object, which would run code as it is
unpickled (a file written by anyone who can write to the run directory, e.g. on a shared cluster filesystem), is
refused like a corrupt one, never executed."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp

from ..comm import Communicator
from ..replicas import join_sharded, split_sharded

VERSION = 1
MARKER = "COMPLETE"
SHARDED_FILES = "dcp"  # the directory of a checkpoint's DCP files


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. disk full: leave no partial file behind
        raise


def save_rank(directory: Path, rank: int, state: dict[str, Any]) -> None:
    """Write this rank's state: payload, then a header line with version and SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = f"slowmo-checkpoint {VERSION} {hashlib.sha256(payload).hexdigest()}\n".encode()
    _atomic_write(directory / f"rank{rank}.pt", header + payload)


def mark_complete(directory: Path, world_size: int, keep: int) -> None:
    """Rank 0, after every rank has saved: the checkpoint becomes valid; older ones beyond ``keep`` go."""
    _atomic_write(directory / MARKER, f"{world_size}\n".encode())
    for old in sorted_checkpoints(directory.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_rank(directory: Path, rank: int) -> dict[str, Any]:
    """This rank's state; raises ValueError if the file is missing, truncated, of another version or corrupt."""
    path = directory / f"rank{rank}.pt"
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: unreadable ({error.strerror})") from None
    header, _, payload = raw.partition(b"\n")
    parts = header.decode(errors="replace").split()
    if len(parts) != 3 or parts[0] != "slowmo-checkpoint":
        raise ValueError(f"{path}: not a slowmo checkpoint")
    if parts[1] != str(VERSION):
        raise ValueError(f"{path}: checkpoint format version {parts[1]}, this slowmo reads version {VERSION}")
    if hashlib.sha256(payload).hexdigest() != parts[2]:
        raise ValueError(f"{path}: checksum mismatch (truncated or corrupt)")
    return loads(payload, str(path))


def loads(payload: bytes, name: str) -> Any:
    """``torch.load`` of ``payload`` with ``weights_only=True``: tensors and plain data; any other pickled object is
    refused (ValueError, one line that starts with ``name``) without being built."""
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"a pickled {found.group(1)}" if found else "a pickled object"
        raise ValueError(
            f"{name}: holds {what}, not only tensors and plain data; not loaded (a slowmo checkpoint never holds one: "
            "this file was not written by slowmo)"
        ) from None


def sorted_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step_*") if (d / MARKER).exists() and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def saved_world(directory: Path) -> int:
    """The number of ranks that wrote a complete checkpoint."""
    return int((directory / MARKER).read_text().strip())


def candidates(root: Path, world_size: int, file_of: Callable[[int], int | None] | None = None) -> list[Path]:
    """Complete checkpoints, newest first; one saved by another number of ranks belongs to another run (ValueError),
    unless ``file_of`` (given the saved world size: which rank's file this rank reads, or None) says how to read it."""
    out = list(reversed(sorted_checkpoints(root)))
    for directory in out:
        saved = saved_world(directory)
        if saved != world_size and (file_of is None or file_of(saved) is None):
            raise ValueError(
                f"checkpoint {directory} was saved by {saved} ranks, this run has {world_size}; resume it with "
                f"{saved} ranks, or start this run in another directory"
            )
    return out


def save(directory: Path, comm: Communicator, state: dict[str, Any], keep: int, who: str) -> None:
    """``state`` as this rank's file of ``directory``; once every rank of ``comm`` has written its own, rank 0 marks the
    checkpoint complete (the newest ``keep`` are kept). A failed write is told in one line that starts with ``who``."""
    tensors, rest = split_sharded(state)  # (a sharded model's: every rank's at once, in DCP's files)
    if tensors:
        dcp.save(tensors, checkpoint_id=str(directory / SHARDED_FILES))
    try:
        save_rank(directory, comm.rank, rest)
    except OSError as error:
        raise OSError(
            f"{who}: cannot write checkpoint {directory} ({error.strerror}); free space or fix permissions, then "
            "resume: the previous checkpoint is still valid"
        ) from None
    with comm.uncounted():
        comm.barrier()
    if comm.rank == 0:
        mark_complete(directory, comm.world_size, keep)


def newest(
    root: Path,
    comm: Communicator,
    device: torch.device,
    like: torch.Tensor,
    file_of: Callable[[int], int | None] | None = None,
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint under ``root`` that every rank of ``comm`` reads whole, with this rank's state (None, None
    when there is none; a sharded model's tensors loaded laid out as ``like``), and the newer ones the ranks skipped
    together, each as ``"step_<k>: <why>"`` (this rank's reason, or that another rank could not read its file).
    ``file_of``: for a checkpoint of another number of ranks, which rank's file this rank reads (sharded replicas
    resharded: the first rank's of its replica)."""
    skipped = []
    for directory in candidates(root, comm.world_size, file_of):
        saved = saved_world(directory)
        mine = comm.rank if saved == comm.world_size else file_of(saved)
        try:
            state, ok, why = load_rank(directory, mine), 1.0, "another rank could not read its file"
        except ValueError as error:
            state, ok, why = None, 0.0, str(error).removeprefix(f"{directory}/")
        with comm.uncounted():
            agreed = comm.all_reduce(torch.tensor([ok], device=device)).item() == comm.world_size
        if agreed:
            return directory, join_sharded(state, directory / SHARDED_FILES, like), skipped
        skipped.append(f"{directory.name}: {why}")
    return None, None, skipped
