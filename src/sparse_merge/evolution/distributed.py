"""Data-parallel scoring of a child: each process scores a contiguous shard of every task's
selection datapoints, and one ``all_gather`` puts the scores back in the suite's order. The
held-out evaluations (of archive members and of the final results) are split the same way.

Run with ``accelerate launch --num_processes N run.py ...`` (or ``torchrun``): every process
holds the live model and runs the same seeded evolution, so every process builds the same
child; only the scoring is split, and every process receives the full score vector, so all of
them take the same replacement decision. A task is split through the sequences it names in
``datapoints`` (every one indexed by datapoint: its examples, and its rows, items, tests or
document ids), or its own ``shard(rank, world)`` method; a task offering neither, or whose
split does not come out at the shard's size, is scored whole on every process (correct, just
not faster). Slicing only ``examples``, as before, paired a function task's prompts with other
functions' tests on every rank but the first, and made every dataset task (which scores its
rows) a "shard" of the whole task, which the gather then refused.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.tasks.base import Task
from sparse_merge.tasks.suite import TaskSuite


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous shard of ``n`` datapoints (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


def shard_task(task: Task, rank: int, world: int) -> Task | None:
    """The datapoints ``shard_bounds`` gives ``rank``, as a task; None when it cannot be split."""
    lo, hi = shard_bounds(len(task), rank, world)
    if hasattr(task, "shard"):
        return task.shard(rank, world)
    names = getattr(task, "datapoints", ())
    if not names:
        return None
    sub = copy.copy(task)
    for name in names:
        if hasattr(task, name):
            values = getattr(task, name)
            setattr(sub, name, type(values)(values[lo:hi]))
    return sub if len(sub) == hi - lo else None


class ShardedScorer:
    """``(model, tokenizer) -> scores [D]`` like ``TaskSuite.score_selection`` (of the
    ``split`` subsets: ``selection`` or ``heldout``), computed across the processes of a
    ``torch.distributed`` group (an Accelerate launch); ``evaluate`` gives the per-task means
    like ``TaskSuite.evaluate_heldout``."""

    def __init__(
        self,
        tasks: TaskSuite,
        rank: int | None = None,
        world: int | None = None,
        split: str = "selection",
    ) -> None:
        if rank is None or world is None:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines
            rank, world = state.process_index, state.num_processes
            self.device = state.device if state.device.type == "cuda" else torch.device("cpu")
        else:
            self.device = torch.device("cpu")
        self.rank, self.world = int(rank), int(world)
        self.suite = tasks
        self.tasks = [getattr(t, split) for t in tasks.tasks.values()]
        self.sizes = [len(t) for t in self.tasks]
        self.shards = [shard_task(t, self.rank, self.world) for t in self.tasks]

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes files."""
        return self.rank == 0

    def _local_sizes(self, rank: int) -> list[int]:
        out = []
        for n, sub in zip(self.sizes, self.shards):
            lo, hi = shard_bounds(n, rank, self.world)
            out.append(hi - lo if sub is not None else 0)
        return out

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[D] float scores in the suite's column order, identical on every process."""
        whole: dict[int, torch.Tensor] = {}
        local = []
        for i, (task, sub) in enumerate(zip(self.tasks, self.shards)):
            if sub is None:
                whole[i] = task.score(model, tokenizer).float().cpu()
            elif len(sub):
                local.append(sub.score(model, tokenizer).float().cpu())
        mine = torch.cat(local) if local else torch.zeros(0)
        counts = [sum(self._local_sizes(r)) for r in range(self.world)]
        if self.world > 1:
            padded = torch.zeros(max(counts), device=self.device)
            padded[: mine.numel()] = mine.to(self.device)
            gathered = [torch.zeros_like(padded) for _ in range(self.world)]
            dist.all_gather(gathered, padded)
            per_rank = [g[:c].cpu() for g, c in zip(gathered, counts)]
        else:
            per_rank = [mine]
        # per rank: its shards of every task, in task order -> task-major, rank-minor
        cursors = [0] * self.world
        out = []
        for i in range(len(self.tasks)):
            if i in whole:
                out.append(whole[i])
                continue
            for r in range(self.world):
                n = self._local_sizes(r)[i]
                out.append(per_rank[r][cursors[r] : cursors[r] + n])
                cursors[r] += n
        return torch.cat(out)

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        """Mean score per task plus their weighted ``mean``, identical on every process."""
        scores = self(model, tokenizer).split(self.sizes)
        return self.suite.summarize(
            {n: s.float().mean().item() for n, s in zip(self.suite.names, scores)}
        )


def leave_process_group() -> None:
    """Leave the process group this process joined (Accelerate's, under ``accelerate launch``),
    if any. Called at interpreter exit (``run.py``): a rank whose gloo threads are still up when
    the interpreter ends can abort ("terminate called without an active exception") after its
    work is done, failing the launch."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
