"""Archive storage (device, host memory, disk files): the same individuals wherever they live,
files that safetensors reads, checksums that catch a damaged file, and a disk-archive run
killed with SIGKILL that resumes to the archive an uninterrupted run ends with."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparse_merge.errors import ConfigError
from sparse_merge.evolution import prune_cache
from sparse_merge.evolution.archive import Archive, map_genome, read_genome_into, write_genome
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.prune_cache import MaskCache, apply_packed_, pack_nonzero
from sparse_merge.evolution.scoring import SparsityAwareScorer

from .linear_problem import LinearProblem

HERE = Path(__file__).resolve().parent


def _filled(storage, tmp_path, dtype=torch.float32):
    a = Archive(3, 1000, 4, dtype, "cpu", storage, tmp_path / storage)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        a.put(i, torch.randn(1000, generator=g).to(dtype), torch.rand(4, generator=g), 0.1 * i, i)
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_storage_holds_the_same_genomes(tmp_path, dtype):
    archives = [_filled(s, tmp_path, dtype) for s in ("device", "cpu", "disk")]
    for slot in range(3):
        first = archives[0].genomes[slot]
        for other in archives[1:]:
            assert torch.equal(other.genomes[slot], first)
            out = torch.empty_like(first)
            assert torch.equal(other.read_into(slot, out), first)


def test_genome_files_are_safetensors_named_by_lineage_id(tmp_path):
    genome = torch.randn(12345, dtype=torch.float32).to(torch.bfloat16)
    path = tmp_path / "00000007.safetensors"
    digest = write_genome(path, genome, 7)
    assert torch.equal(load_file(path)["genome"], genome)  # plain safetensors
    assert torch.equal(map_genome(path), genome)
    out = torch.empty_like(genome)
    read_genome_into(path, out)
    assert torch.equal(out, genome) and len(digest) == 64
    with pytest.raises(ValueError, match="expected"):
        read_genome_into(path, torch.empty(12345))  # float32 buffer for a bf16 file


def test_a_member_that_leaves_loses_its_file_unless_a_checkpoint_needs_it(tmp_path):
    a = _filled("disk", tmp_path)
    root = tmp_path / "disk"
    a.put(0, torch.zeros(1000), torch.zeros(4), 0.0, 3)  # id 0 leaves, nothing pinned it
    assert sorted(p.name for p in root.iterdir()) == [f"{i:08d}.safetensors" for i in (1, 2, 3)]
    a.checkpointed()  # the checkpoint refers to 3, 1, 2
    a.put(1, torch.ones(1000), torch.zeros(4), 0.0, 4)  # id 1 leaves, still needed
    assert (root / "00000001.safetensors").exists()
    a.checkpointed()
    assert not (root / "00000001.safetensors").exists()


def test_state_of_one_storage_loads_into_another_and_checks_checksums(tmp_path):
    disk = _filled("disk", tmp_path)
    state = disk.state_dict()
    assert "genomes" not in state and state["files"][2] == "00000002.safetensors"
    host = Archive(3, 1000, 4, storage="cpu")
    host.load_state_dict(state, tmp_path / "disk")
    assert all(torch.equal(host.genomes[i], disk.genomes[i]) for i in range(3))
    again = Archive(3, 1000, 4, storage="disk", root=tmp_path / "other")
    again.load_state_dict(host.state_dict())  # genomes written into files
    assert all(torch.equal(again.genomes[i], disk.genomes[i]) for i in range(3))
    path = tmp_path / "disk" / "00000001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # one damaged byte
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        Archive(3, 1000, 4, storage="disk", root=tmp_path / "disk").load_state_dict(state)


@pytest.mark.parametrize("damage", ["empty", "cut in the header", "zeroed", "a folder", "F16"])
def test_a_damaged_genome_file_is_one_error_naming_it(tmp_path, damage):
    """A file emptied, cut short or zeroed (an interrupted copy of a run folder) was a bare
    struct or JSON error naming no file; a header changed to another dtype (outside the
    checksum) passed and the genome was read as float16."""
    state = _filled("disk", tmp_path, torch.bfloat16).state_dict()
    path = tmp_path / "disk" / "00000001.safetensors"
    raw = path.read_bytes()
    if damage == "a folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(
            {
                "empty": b"",
                "cut in the header": raw[:20],
                "zeroed": bytes(len(raw)),
                "F16": raw.replace(b'"BF16"', b'"F16" '),
            }[damage]
        )
    archive = Archive(3, 1000, 4, torch.bfloat16, "cpu", "cpu")
    with pytest.raises(ValueError, match=f"{path}.*(damaged|checksum)"):
        archive.load_state_dict(state, tmp_path / "disk")


def test_disk_archive_needs_a_run_folder():
    engine = NaturalNiches(pop_size=4, iterations=2, archive="disk")
    with pytest.raises(ConfigError, match="evolver.archive"):
        engine.evolve(LinearProblem(), SparsityAwareScorer())
    with pytest.raises(ConfigError, match="archive"):
        NaturalNiches(archive="gpu")


def _prune_half(genome, sparsity):
    genome[: genome.numel() // 2] = 0


def test_packed_masks_reproduce_the_pruned_genome_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    genome = torch.randn(1003, generator=g)
    pruned = genome.clone()
    pruned[torch.rand(1003, generator=g) < 0.5] = 0
    packed = pack_nonzero(pruned)
    assert packed.dtype == torch.uint8 and packed.numel() == 126  # ceil(1003 / 8)
    again = apply_packed_(genome.clone(), packed)
    assert torch.equal(again, pruned)


def test_mask_cache_prunes_each_member_and_sparsity_once_within_its_budget():
    genome = torch.randn(1003, generator=torch.Generator().manual_seed(2))
    cache = MaskCache(max_bytes=300)  # room for two masks of 126 bytes
    expected = genome.clone()
    _prune_half(expected, 0.5)
    for ident in (1, 2, 1):
        out = genome.clone()
        cache.prune_(out, ident, 0.5, _prune_half)
        assert torch.equal(out, expected)
    assert (cache.hits, cache.misses) == (1, 2)
    cache.prune_(genome.clone(), 1, 0.25, _prune_half)  # another sparsity: another mask
    assert cache.misses == 3 and len(cache) == 2  # the least recently used (2) went
    cache.forget(1)
    assert len(cache) == 0


SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from evolution.linear_problem import LinearProblem
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.schedules import CyclicSchedule
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.tracking.logger import RunLogger

class Slow(LinearProblem):
    def evaluate(self, genome):
        time.sleep({delay})
        return super().evaluate(genome)

run_dir = sys.argv[1]
logger = RunLogger(console=False).start(run_dir)
engine = NaturalNiches(pop_size=5, iterations=30, checkpoint_every=4, archive="disk",
                       mutation_std=0.05, schedule=CyclicSchedule(0.0, None, period=4))
engine.evolve(Slow(), SparsityAwareScorer(alpha=1.0, beta=0.5), seed=5, target=0.5,
              run_dir=run_dir, logger=logger, resume=len(sys.argv) > 2)
logger.close()
"""


def _run(run_dir: Path, *extra: str, delay: float) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(HERE.parent), delay=delay)
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _steps(run_dir: Path) -> list[int]:
    log = run_dir / "log.jsonl"
    if not log.exists():
        return []
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    return [x["step"] for x in lines if x.get("event") == "step"]


def test_a_killed_disk_archive_run_resumes_to_the_uninterrupted_archive(tmp_path):
    full = _run(tmp_path / "full", delay=0.0)
    cut = _run(tmp_path / "cut", delay=0.05)
    deadline = time.monotonic() + 60
    while max(_steps(tmp_path / "cut"), default=-1) < 13 and time.monotonic() < deadline:
        time.sleep(0.02)
    cut.send_signal(signal.SIGKILL)  # no clean-up of any kind
    cut.wait()
    assert full.wait() == 0
    stopped = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"]
    assert 12 <= stopped < 30  # killed mid-way, after a checkpoint
    assert _run(tmp_path / "cut", "resume", delay=0.0).wait() == 0
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for key in ("scores", "sparsity", "valid", "ids"):
        assert torch.equal(a["archive"][key], b["archive"][key]), key
    assert a["archive"]["sha256"] == b["archive"]["sha256"]  # the same genomes, byte for byte
    assert a["lineage"] == b["lineage"]
    files = sorted(p.name for p in (tmp_path / "cut" / "archive").iterdir())
    assert files == sorted(a["archive"]["files"])  # nothing left over from the killed run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_packed_nonzero_bits_are_numpys_packbits_of_not_zero(dtype):
    # signed zeros count as zero; NaN, infinities and subnormals as non-zero; the genome's
    # length past a piece and not a multiple of 8
    n = prune_cache.PIECE + 1003
    g = torch.Generator().manual_seed(3)
    genome = torch.randn(n, generator=g).to(dtype)
    genome[torch.rand(n, generator=g) < 0.5] = 0.0
    genome[torch.rand(n, generator=g) < 0.1] = -0.0
    specials = [float("nan"), float("inf"), -float("inf"), torch.finfo(dtype).tiny / 2, -0.0]
    genome[:5] = torch.tensor(specials, dtype=dtype)
    expected = np.packbits((genome != 0).numpy())
    assert np.array_equal(pack_nonzero(genome).numpy(), expected)
    assert torch.equal(
        apply_packed_(torch.ones(n, dtype=dtype), pack_nonzero(genome)), (genome != 0).to(dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_packed_mask_zeroes_as_torch_multiplies_by_it(dtype, monkeypatch):
    # one pass on the CPU (float32, bfloat16: ``kernels.mul_packed_``) or torch's multiply:
    # the same bits, with NaN, infinities and signed zeros among the weights; in pieces and
    # in parts on two threads, the length not a multiple of 8
    from sparse_merge.merging import kernels

    monkeypatch.setattr(kernels, "UNPACK", 1 << 10)
    monkeypatch.setattr(kernels, "PART_MIN", 1 << 12)
    n = 3 * (1 << 12) + 1003
    g = torch.Generator().manual_seed(4)
    genome = torch.randn(n, generator=g).to(dtype)
    genome[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, -1.0, 0.0])
    keep = torch.rand(n, generator=g) < 0.5
    keep[:3] = False  # NaN times zero, infinities times zero
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = apply_packed_(genome.clone(), torch.from_numpy(np.packbits(keep.numpy())))
    finally:
        torch.set_num_threads(threads)
    expected = genome.clone().mul_(keep)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(dtype)
    if bits is None:
        assert torch.equal(out.nan_to_num(7.0), expected.nan_to_num(7.0))
    else:
        assert torch.equal(out[3:].view(bits), expected[3:].view(bits))  # NaN payloads aside
        assert out[:3].isnan().all() and expected[:3].isnan().all()
