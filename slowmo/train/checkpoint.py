"""Checkpoints: one file per rank in ``<run_dir>/checkpoints/step_<k>/``, each written atomically (temporary file,
fsync, rename), with a version and a checksum; a checkpoint counts only once rank 0 has written ``COMPLETE`` after
every rank's file. Loading skips a truncated, corrupt or foreign checkpoint for the previous valid one, and says which
it skipped and why; the last ``keep`` checkpoints are kept.

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
from pathlib import Path
from typing import Any

import torch

from ..comm import Communicator

VERSION = 1
MARKER = "COMPLETE"


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


def candidates(root: Path, world_size: int) -> list[Path]:
    """Complete checkpoints, newest first; one saved by another number of ranks belongs to another run (ValueError)."""
    out = list(reversed(sorted_checkpoints(root)))
    for directory in out:
        saved_world = (directory / MARKER).read_text().strip()
        if saved_world != str(world_size):
            raise ValueError(
                f"checkpoint {directory} was saved by {saved_world} ranks, this run has {world_size}; resume it with "
                f"{saved_world} ranks, or start this run in another directory"
            )
    return out


def save(directory: Path, comm: Communicator, state: dict[str, Any], keep: int, who: str) -> None:
    """``state`` as this rank's file of ``directory``; once every rank of ``comm`` has written its own, rank 0 marks the
    checkpoint complete (the newest ``keep`` are kept). A failed write is told in one line that starts with ``who``."""
    try:
        save_rank(directory, comm.rank, state)
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
    root: Path, comm: Communicator, device: torch.device
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint under ``root`` that every rank of ``comm`` reads whole, with this rank's state (None, None
    when there is none), and the newer ones the ranks skipped together, each as ``"step_<k>: <why>"`` (this rank's
    reason, or that another rank could not read its file)."""
    skipped = []
    for directory in candidates(root, comm.world_size):
        try:
            state, ok, why = load_rank(directory, comm.rank), 1.0, "another rank could not read its file"
        except ValueError as error:
            state, ok, why = None, 0.0, str(error).removeprefix(f"{directory}/")
        with comm.uncounted():
            agreed = comm.all_reduce(torch.tensor([ok], device=device)).item() == comm.world_size
        if agreed:
            return directory, state, skipped
        skipped.append(f"{directory.name}: {why}")
    return None, None, skipped
