"""The archive: a fixed number of slots holding genomes, their selection scores, their sparsity
and their lineage ids, plus the replacement rule (the lowest total score leaves).

Where the genomes live is a setting (``evolver.archive``):

* ``device``: one ``[pop, P]`` tensor on the model's device (fastest; the archive alone is
  ``pop * P`` elements there: 49 GB for Qwen2.5-1.5B in bf16 at pop 16).
* ``cpu``: the same tensor in host memory (pinned when the model is on CUDA); parents are copied
  to the device when they are picked.
* ``disk``: one safetensors file per individual (``<root>/<id>.safetensors``, named by lineage
  id), written once when it enters and read back chunk by chunk into the device buffers when it
  is picked, so host memory stays flat as the population grows. A checkpoint then records
  which files make the archive and their SHA-256, not the genomes: its cost is O(one child).

Genomes are stored in the model's dtype (bf16 when the model runs in bf16).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_merge.errors import ConfigError, check_choice
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.tracking.io import write_atomic

ARCHIVE_STORAGE = ("device", "cpu", "disk")
IO_CHUNK = 1 << 24  # bytes per read/write of a genome file (bounds staging buffers)
GENOME_FORMAT = "sparse_merge-genome-v1"

# safetensors' names of the dtypes a genome can have
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a writable uint8 NumPy array (shared memory)."""
    return t.view(torch.uint8).numpy()


def write_genome(path: Path, genome: torch.Tensor, ident: int) -> str:
    """Write ``genome`` [P] to ``path`` as a safetensors file holding one tensor, ``genome``,
    atomically and chunk by chunk (no host copy of the whole genome); returns its SHA-256.

    The format is plain safetensors (``safetensors.torch.load_file`` reads it); it is written
    here rather than with ``save_file`` because that builds the whole file in memory first.
    """
    if genome.dtype not in _ST_DTYPES:
        raise ValueError(f"genome dtype {genome.dtype} is not one of {list(_ST_DTYPES)}")
    nbytes = genome.numel() * genome.element_size()
    header = {
        "genome": {
            "dtype": _ST_DTYPES[genome.dtype],
            "shape": [genome.numel()],
            "data_offsets": [0, nbytes],
        },
        "__metadata__": {"format": GENOME_FORMAT, "id": str(ident)},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    per_chunk = max(IO_CHUNK // genome.element_size(), 1)
    digest = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for s in range(0, genome.numel(), per_chunk):
                chunk = genome[s : s + per_chunk].detach().contiguous().cpu()
                data = memoryview(_bytes_view(chunk))
                digest.update(data)
                f.write(data)

    write_atomic(path, write)
    return digest.hexdigest()


def _data_offset(path: Path) -> tuple[int, int, torch.dtype]:
    """(byte offset of the data, its length, dtype) of a genome file; a file that is not one
    (empty, cut short, zeroed, a folder) is one ``ValueError`` naming it (it was a bare
    ``struct.error`` or ``JSONDecodeError`` naming no file)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > IO_CHUNK:
                raise ValueError(f"a header of {n} bytes")
            header = json.loads(f.read(n))
        meta = header["genome"]
        dtype = {v: k for k, v in _ST_DTYPES.items()}[meta["dtype"]]
        start, stop = (int(x) for x in meta["data_offsets"])
        if path.stat().st_size < 8 + n + stop:
            raise ValueError("the file ends before its data")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ValueError(f"{path} is not a whole genome file ({exc}); it is damaged") from None
    return 8 + n + start, stop - start, dtype


def read_genome_into(path: Path, out: torch.Tensor) -> None:
    """Fill ``out`` [P] (any device) from a genome file, chunk by chunk: straight into ``out``
    on the CPU, through one pinned bounce buffer of ``IO_CHUNK`` bytes for a GPU."""
    offset, nbytes, dtype = _data_offset(path)
    if dtype != out.dtype or nbytes != out.numel() * out.element_size():
        raise ValueError(
            f"{path}: holds {nbytes} bytes of {dtype}, expected {out.numel()} x {out.dtype}"
        )
    per_chunk = max(IO_CHUNK // out.element_size(), 1)
    bounce = None
    if out.device.type != "cpu" or not out.is_contiguous():
        bounce = torch.empty(
            min(per_chunk, out.numel()), dtype=out.dtype, pin_memory=out.device.type == "cuda"
        )
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for s in range(0, out.numel(), per_chunk):
            e = min(s + per_chunk, out.numel())
            target = out[s:e] if bounce is None else bounce[: e - s]
            view = memoryview(_bytes_view(target))
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(
                        f"{path}: file ends after {s * out.element_size() + got} bytes"
                    )
                got += n
            if bounce is not None:
                out[s:e].copy_(target)


def map_genome(path: Path) -> torch.Tensor:
    """The genome of a file as a memory-mapped CPU tensor (copy-on-write: writes stay in memory
    and never reach the file); pages are read when touched."""
    offset, nbytes, dtype = _data_offset(path)
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
    return torch.from_numpy(raw).view(dtype)


def file_sha256(path: Path) -> str:
    """SHA-256 of a genome file's data (what ``write_genome`` returned)."""
    offset, nbytes, _ = _data_offset(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while nbytes > 0:
            block = f.read(min(IO_CHUNK, nbytes))
            if not block:
                break
            digest.update(block)
            nbytes -= len(block)
    return digest.hexdigest()


class _Genomes:
    """``archive.genomes[slot]``: the genome of a slot, whatever the storage."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self._archive.genome(int(slot))

    def __len__(self) -> int:
        return self._archive.pop_size


class Archive:
    """``pop_size`` slots; an empty slot (``valid=False``) holds nothing and is never sampled.

    genomes [pop, P] (the problem's dtype; where ``storage`` says), scores [pop, D] (float32,
    CPU), sparsity [pop] (float64, CPU), ids [pop] (lineage id, -1 when empty).

    ``storage='disk'`` needs ``root``, the folder of the genome files. A file whose individual
    left the archive is deleted at once unless the last checkpoint still refers to it; then it
    is deleted after the next checkpoint (``checkpointed()``), so a resume always finds its
    files and the folder holds at most ``pop_size + checkpoint_every`` genomes.
    """

    def __init__(
        self,
        pop_size: int,
        numel: int,
        n_datapoints: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        storage: str = "device",
        root: str | Path | None = None,
    ) -> None:
        if pop_size < 2:
            raise ValueError(f"pop_size={pop_size}: an archive needs at least 2 slots")
        self.storage = check_choice("evolver.archive", storage, ARCHIVE_STORAGE)
        self.numel, self.dtype, self.device = int(numel), dtype, torch.device(device)
        self._rows: torch.Tensor | None = None
        self.root: Path | None = None
        if storage == "disk":
            if root is None:
                raise ConfigError("evolver.archive", storage, "device or cpu without a run folder")
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        elif storage == "device":
            self._rows = torch.zeros(pop_size, numel, dtype=dtype, device=self.device)
        else:  # host memory, pinned for fast copies to a GPU
            pin = self.device.type == "cuda"
            self._rows = torch.zeros(pop_size, numel, dtype=dtype, pin_memory=pin)
        self.scores = torch.zeros(pop_size, n_datapoints, dtype=torch.float32)  # [pop, D]
        self.sparsity = torch.zeros(pop_size, dtype=torch.float64)  # [pop]
        self.valid = torch.zeros(pop_size, dtype=torch.bool)  # [pop]
        self.ids = torch.full((pop_size,), -1, dtype=torch.long)  # [pop]
        self.sha256: list[str] = [""] * pop_size  # disk: checksum of each slot's file
        self._pinned: set[int] = set()  # ids the last checkpoint refers to (disk)
        self._leaving: set[int] = set()  # ids that left but are still pinned (disk)

    @property
    def pop_size(self) -> int:
        """Number of slots."""
        return self.valid.numel()

    def __len__(self) -> int:
        """Number of occupied slots."""
        return int(self.valid.sum())

    @property
    def genomes(self) -> _Genomes:
        """``genomes[slot]``: see ``genome``."""
        return _Genomes(self)

    def path(self, ident: int) -> Path:
        """The file of individual ``ident`` (disk storage)."""
        assert self.root is not None
        return self.root / f"{int(ident):08d}.safetensors"

    def genome(self, slot: int) -> torch.Tensor:
        """The genome [P] of ``slot``: a view of the stored row (device, cpu) or a memory-mapped
        tensor of its file (disk; do not write into it). To feed the model, ``read_into``."""
        if self._rows is not None:
            return self._rows[slot]
        if not self.valid[slot]:
            return torch.zeros(self.numel, dtype=self.dtype)
        return map_genome(self.path(int(self.ids[slot])))

    @torch.no_grad()
    def read_into(self, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Copy the genome of ``slot`` into ``out`` (any device); returns ``out``."""
        if self._rows is not None:
            out.copy_(self._rows[slot], non_blocking=False)
        else:
            read_genome_into(self.path(int(self.ids[slot])), out)
        return out

    def empty_slot(self) -> int | None:
        """The first empty slot, or None when the archive is full."""
        empty = (~self.valid).nonzero()
        return int(empty[0]) if len(empty) else None

    @torch.no_grad()
    def put(
        self, slot: int, genome: torch.Tensor, scores: torch.Tensor, sparsity: float, ident: int
    ) -> None:
        """Store an individual in ``slot`` (whatever was there leaves)."""
        if self._rows is not None:
            self._rows[slot].copy_(genome)
        else:
            self.sha256[slot] = write_genome(self.path(ident), genome, ident)
            if self.valid[slot]:
                self._leave(int(self.ids[slot]))
        self.scores[slot] = scores.detach().float().cpu()
        self.sparsity[slot] = float(sparsity)
        self.valid[slot] = True
        self.ids[slot] = int(ident)

    def _leave(self, ident: int) -> None:
        if ident in self._pinned:
            self._leaving.add(ident)
        else:
            self.path(ident).unlink(missing_ok=True)

    def clear_files(self) -> None:
        """Remove every genome file in the folder (a fresh run in a folder used before)."""
        if self.root is not None:
            for stale in self.root.glob("*.safetensors*"):
                stale.unlink()

    def checkpointed(self) -> None:
        """A checkpoint of the current archive is on disk: files only older checkpoints
        referred to can go (disk storage)."""
        if self.root is None:
            return
        self._pinned = {int(i) for i in self.ids[self.valid]}
        for ident in self._leaving - self._pinned:
            self.path(ident).unlink(missing_ok=True)
        self._leaving &= self._pinned

    def occupied(self) -> list[int]:
        """Indices of the occupied slots, in slot order."""
        return [int(i) for i in self.valid.nonzero().flatten()]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the archive exactly: the genomes themselves (device,
        cpu) or the names and SHA-256 of their files (disk)."""
        state: dict[str, Any] = {
            "storage": self.storage,
            "scores": self.scores,
            "sparsity": self.sparsity,
            "valid": self.valid,
            "ids": self.ids,
        }
        if self._rows is not None:
            state["genomes"] = self._rows.cpu()
        else:
            state["files"] = [
                self.path(int(i)).name if v else "" for i, v in zip(self.ids, self.valid)
            ]
            state["sha256"] = list(self.sha256)
        return state

    def load_state_dict(self, state: dict[str, Any], root: str | Path | None = None) -> None:
        """Restore from ``state_dict()`` (shapes must match). A state of a disk archive reads its
        files from ``root`` (default: this archive's folder), checking each one's SHA-256; files
        in this archive's folder that the state does not list are removed (children made after
        the checkpoint, made again on resume)."""
        for key in ("scores", "sparsity", "valid", "ids"):
            mine = getattr(self, key)
            if mine.shape != state[key].shape:
                raise ValueError(
                    f"checkpoint archive {key} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(mine.shape)} (different pop_size or problem?)"
                )
            mine.copy_(state[key])
        if "genomes" in state:
            if state["genomes"].shape != (self.pop_size, self.numel):
                raise ValueError(
                    f"checkpoint archive genomes have shape {tuple(state['genomes'].shape)}, "
                    f"expected {(self.pop_size, self.numel)} (different pop_size or problem?)"
                )
            if self._rows is not None:
                self._rows.copy_(state["genomes"])
            else:
                for slot in self.occupied():
                    self.sha256[slot] = write_genome(
                        self.path(int(self.ids[slot])), state["genomes"][slot], int(self.ids[slot])
                    )
        else:
            source = Path(root) if root is not None else self.root
            for slot in self.occupied():
                path = source / state["files"][slot]
                if not path.exists():
                    raise FileNotFoundError(f"archive file {path} of the checkpoint is missing")
                if file_sha256(path) != state["sha256"][slot]:
                    raise ValueError(f"archive file {path} does not match its checkpoint checksum")
                _, nbytes, dtype = _data_offset(path)  # the header is outside the checksum
                if dtype != self.dtype or nbytes != self.numel * self.dtype.itemsize:
                    raise ValueError(
                        f"archive file {path} holds {nbytes} bytes of {dtype}, the archive "
                        f"{self.numel} x {self.dtype}: its header is damaged"
                    )
                if self._rows is not None:
                    read_genome_into(path, self._rows[slot])
                else:
                    self.sha256[slot] = state["sha256"][slot]
        if self.root is not None:
            listed = {self.path(int(i)).name for i in self.ids[self.valid]}
            for stale in self.root.glob("*.safetensors*"):  # and temp files of a killed write
                if stale.name not in listed:
                    stale.unlink()
            self._pinned = {int(i) for i in self.ids[self.valid]}
            self._leaving = set()


def replacement_slot(
    scorer: SparsityAwareScorer,
    archive: Archive,
    child_scores: torch.Tensor,
    child_sparsity: float,
    enter_on_tie: bool = False,
) -> int | None:
    """The slot a child takes, or None when it does not enter.

    While a slot is empty the child fills it. Otherwise the child joins, totals are computed
    over the archive plus the child, and the individual with the lowest total leaves; on a tie
    at the lowest total the child is the one that leaves (a newcomer must beat someone), or,
    with ``enter_on_tie``, the first tied archive member (the M2N2 reference's argmin).
    """
    slot = archive.empty_slot()
    if slot is not None:
        return slot
    scores = torch.cat([archive.scores, child_scores.float().cpu()[None]])  # [pop + 1, D]
    sparsity = torch.cat([archive.sparsity, torch.tensor([float(child_sparsity)])])
    total = scorer.total(scores, sparsity)  # [pop + 1]
    lowest = (total == total.min()).nonzero().flatten()
    child = archive.pop_size
    if lowest[0] == child or ((lowest == child).any() and not enter_on_tie):
        return None
    return int(lowest[0])
