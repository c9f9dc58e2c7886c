"""The task-vector search space: a genome is a set of coefficients on the parents' task vectors
(per task and per layer group) plus the pruning sparsity of the merged model.

The model a genome stands for is built in two steps (``materialize``):

1. **merge** with the space's merge method, tensor by tensor: for a tensor in group ``g``,
   ``merged = method(base, parents, weights=coef[:, g])`` -- for plain task arithmetic
   ``base + sum_t coef[t, g] * (parent_t - base)``; TIES, DARE and the other task-vector methods
   trim, drop or elect signs of the same deltas (DARE's and DELLA's random masks are drawn from
   a generator seeded once per run, so a genome always stands for the same model);
2. **prune** the merged weights with the run's pruner to the genome's last gene, the pruning
   sparsity ``s`` (nothing when ``s <= 0``).

Genome layout: ``[T * G coefficients (task-major), s]``, ``T`` parents, ``G`` layer groups
(``groups``: ``model`` one group, ``block`` one group per decoder block plus one for everything
outside the blocks -- embeddings, final norm, head --, ``tensor`` one per parameter tensor).

What the engine's operators do here: crossover (a linear merge with a split point) mixes
coefficient vectors, so a child takes one parent's coefficients for the first layers and the
other's for the rest; Gaussian mutation moves every coefficient (zeros too: a zero coefficient
is not a pruned weight); pruning as a mutation sets the ``s`` gene. The sparsity the scorer
sees is measured exactly on the final weights (after merging and pruning), like everywhere else.

The initial archive holds the base (all coefficients 0), each parent (its own coefficients 1,
the others 0: the parent itself, up to rounding, for task arithmetic) and their sum (all
coefficients 1: task arithmetic at weight 1), so crossover can reach every point between
them and mutation beyond.
"""

from __future__ import annotations

import re

import torch

from sparse_merge.errors import check_choice, check_fraction
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.merging.base import MergeMethod

GROUPINGS = ("model", "block", "tensor")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_groups(names: list[str], grouping: str) -> tuple[list[int], list[str]]:
    """(group index per parameter name, group names) for ``grouping`` (see module docstring)."""
    check_choice("groups", grouping, GROUPINGS)
    if grouping == "model":
        return [0] * len(names), ["model"]
    if grouping == "tensor":
        return list(range(len(names))), list(names)
    labels = []
    for name in names:
        m = _BLOCK.search(name)
        labels.append(f"block{int(m.group(1))}" if m else "other")
    order = sorted(set(labels), key=lambda x: (x == "other", int(x[5:]) if x != "other" else 0))
    index = {label: i for i, label in enumerate(order)}
    return [index[label] for label in labels], order


class TaskVectorProblem:
    """A ``Problem`` over task-vector coefficients; evaluation goes through the model problem.

    Args:
        inner: the model problem (its parents, base, tasks, pruner and live model).
        method: a merge method that works on task vectors (``needs_base``).
        groups: ``model``, ``block`` or ``tensor`` (coefficients per group, see module docstring).
        max_sparsity: the ``s`` gene is clamped to ``[0, max_sparsity]`` when a model is built.
        seed: seeds the masks of a stochastic method (DARE, DELLA) once for the whole run.
    """

    def __init__(
        self,
        inner: LLMProblem,
        method: MergeMethod,
        groups: str = "block",
        max_sparsity: float = 0.95,
        seed: int = 0,
    ) -> None:
        if inner.base is None:
            raise ValueError("the task-vector space needs the base model (model.base)")
        if not getattr(method, "needs_base", False):
            raise ValueError(
                f"the task-vector space needs a task-vector merge method, got {type(method).__name__}"
            )
        self.inner, self.method, self.seed = inner, method, int(seed)
        self.max_sparsity = check_fraction("max_sparsity", max_sparsity)
        self.names = list(inner.parents)
        slots = inner.space.slots
        self.group_of, self.group_names = layer_groups([s.name for s in slots], groups)
        self.n_tasks, self.n_groups = len(self.names), len(self.group_names)
        self.numel = self.n_tasks * self.n_groups + 1
        self.n_datapoints = inner.n_datapoints
        self.task_names = inner.task_names
        self.column_weights = inner.column_weights
        self._workspace = torch.zeros(self.numel, dtype=torch.float64)  # [T * G + 1]
        # the genome whose model the live model holds, and the inner problem's write count then
        self._built: tuple[torch.Tensor, int] | None = None

    @property
    def workspace(self) -> torch.Tensor:
        """The coefficient buffer [T * G + 1] children are written into."""
        return self._workspace

    def coefficients(self, genome: torch.Tensor) -> torch.Tensor:
        """[T, G] task-vector coefficients of ``genome``."""
        return genome[:-1].view(self.n_tasks, self.n_groups)

    def initial(self) -> dict[str, torch.Tensor]:
        """The base (all 0), each parent (one-hot) and ``task_arithmetic`` (all 1), ``s = 0``."""
        out = {"base": torch.zeros(self.numel, dtype=torch.float64)}
        for t, name in enumerate(self.names):
            g = torch.zeros(self.numel, dtype=torch.float64)
            self.coefficients(g)[t] = 1.0
            out[name] = g
        every = torch.ones(self.numel, dtype=torch.float64)
        every[-1] = 0.0
        out["task_arithmetic"] = every
        return out

    @torch.no_grad()
    def materialize(self, genome: torch.Tensor) -> torch.Tensor:
        """Build the model ``genome`` stands for in the live model; returns its weights [P]
        (the live buffer itself). Rebuilt only when the genome changed since the last call."""
        ws = self.inner.workspace
        built = self._built
        if built is not None and built[1] == self.inner.writes and torch.equal(built[0], genome):
            return ws
        coef = self.coefficients(genome).tolist()  # [T][G]
        base, space = self.inner.base, self.inner.space
        parents = list(self.inner.parents.values())
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + 71)
        for slot, group in zip(space.slots, self.group_of):
            lo, hi = slot.offset, slot.stop
            merged = self.method.merge_tensor(
                base[lo:hi].view(slot.shape),
                [p[lo:hi].view(slot.shape) for p in parents],
                [coef[t][group] for t in range(self.n_tasks)],
                rng,
            )
            ws[lo:hi].copy_(merged.reshape(-1))
        s = min(max(float(genome[-1]), 0.0), self.max_sparsity)
        self.inner.prune_(ws, s)
        self.inner.writes += 1  # the merge above wrote the workspace too
        self._built = (genome.detach().clone(), self.inner.writes)
        return ws

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        """[D] selection scores of the model ``genome`` stands for."""
        return self.inner.evaluate(self.materialize(genome))

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Held-out scores of the model ``genome`` stands for."""
        return self.inner.heldout(self.materialize(genome))

    def sparsity(self, genome: torch.Tensor, epsilon: float = 0.0) -> float:
        """Sparsity of the final weights (after merging and pruning); exact at ``epsilon=0``."""
        return self.inner.sparsity(self.materialize(genome), epsilon)

    def layer_sparsity(self, genome: torch.Tensor) -> dict[str, float]:
        """Exact per-layer sparsity of the final weights."""
        return self.inner.layer_sparsity(self.materialize(genome))

    def prune_(self, genome: torch.Tensor, target: float) -> None:
        """Pruning as a mutation: set the genome's pruning sparsity to ``target``."""
        genome[-1] = float(target)

    @torch.no_grad()
    def mutate_(self, genome: torch.Tensor, std: float, generator: torch.Generator) -> int:
        """Add ``N(0, std^2)`` to every coefficient (not to ``s``); returns how many moved."""
        if std <= 0:
            return 0
        noise = torch.randn(self.numel - 1, generator=generator, dtype=torch.float64)
        genome[:-1].add_(noise.to(genome.device, genome.dtype), alpha=std)
        return self.numel - 1

    def weights(self, genome: torch.Tensor) -> torch.Tensor:
        """The final model weights [P] of ``genome`` (a copy)."""
        return self.materialize(genome).clone()

    def describe(self, genome: torch.Tensor) -> dict[str, object]:
        """Coefficients by task and group, and the pruning sparsity, for reports."""
        coef = self.coefficients(genome)
        return {
            "coefficients": {
                name: dict(zip(self.group_names, [round(float(c), 4) for c in coef[t]]))
                for t, name in enumerate(self.names)
            },
            "prune_sparsity": float(genome[-1]),
        }
