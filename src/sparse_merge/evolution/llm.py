"""The ``Problem`` of merging causal LMs: genomes are ParamSpace rows, scores come from a
TaskSuite's selection split, pruning is the run's Pruner on the live model. The base model the
parents were fine-tuned from (when known) is part of the problem: merge methods that work on
task vectors need it, and it can join the initial archive."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.evolution.problem import is_workspace, slots_layer_sparsity, slots_sparsity
from sparse_merge.merging.base import MergeMethod, Segment, tensor_segments
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.base import Calibration, Pruner, prune_in_place
from sparse_merge.tasks.suite import TaskSuite

# scores [D] of the live model on the selection split; the default is the suite's own scoring
SelectionScorer = Callable[[nn.Module, PreTrainedTokenizerBase], torch.Tensor]
# held-out mean per task plus ``mean``; the default is TaskSuite.evaluate_heldout
HeldoutEvaluator = Callable[[nn.Module, PreTrainedTokenizerBase], dict[str, float]]


class LLMProblem:
    """Parents of one architecture in a ``ParamSpace``; the workspace is its flat buffer.

    ``score_selection`` replaces the suite's single-process scoring (the multi-process
    evaluator passes its own); it must return the same [D] scores in the same order.
    ``evaluate_heldout`` likewise replaces ``TaskSuite.evaluate_heldout``.

    ``base`` is the genome the parents were fine-tuned from (``None`` when unknown);
    ``include_base`` puts it in the initial archive, under the name ``base``.
    """

    def __init__(
        self,
        space: ParamSpace,
        tokenizer: PreTrainedTokenizerBase,
        parents: dict[str, torch.Tensor],
        tasks: TaskSuite,
        pruner: Pruner | None = None,
        calibration: Calibration | None = None,
        score_selection: SelectionScorer | None = None,
        evaluate_heldout: HeldoutEvaluator | None = None,
        base: torch.Tensor | None = None,
        include_base: bool = False,
    ) -> None:
        if not parents:
            raise ValueError("LLMProblem needs at least one parent genome")
        if include_base and base is None:
            raise ValueError("include_base=True needs the base genome")
        if "base" in parents and base is not None:
            raise ValueError("a parent is named 'base', the name of the base model")
        for name, g in {**parents, **({} if base is None else {"base": base})}.items():
            if g.shape != space.flat.shape:
                raise ValueError(
                    f"parent {name!r} has shape {tuple(g.shape)}, expected {tuple(space.flat.shape)}"
                )
        self.space, self.tokenizer, self.tasks = space, tokenizer, tasks
        self.parents = dict(parents)
        self.base, self.include_base = base, bool(include_base)
        self.writes = 0  # counts writes into the workspace (lets a caller keep a build cached)
        self.pruner, self.calibration = pruner, calibration
        self._in_loop: Pruner | None = None  # the pruner's in-loop form, built on first use
        self._score = score_selection or tasks.score_selection
        self._heldout = evaluate_heldout or tasks.evaluate_heldout
        self._heldout_memo: dict[str, dict[str, float]] = {}
        self.numel = space.numel
        self.n_datapoints = tasks.n_selection
        self.task_names = tasks.names
        # [D] the benchmarks' weights per selection column (mean 1; None: all weigh 1)
        self.column_weights = tasks.selection_weights()
        # the slot of every prunable weight in the genome: sparsity without a model load
        layers = prunable_layers(space.model)
        self.prunable_slots = [space.slot(layer.param_name) for layer in layers]
        self._layer_names = [layer.name for layer in layers]

    @property
    def workspace(self) -> torch.Tensor:
        """The live model's flat parameter buffer [P]."""
        return self.space.flat

    @property
    def prune_is_mask(self) -> bool:
        """Whether pruning only zeroes weights, deterministically (then the engine may cache
        the keep-masks of pruned parents); SparseGPT also updates the kept weights."""
        return self.pruner is not None and not getattr(self.pruner, "updates_weights", False)

    @property
    def model(self) -> nn.Module:
        """The live model (its parameters are views into the workspace)."""
        return self.space.model

    @property
    def segments(self) -> list[Segment]:
        """Where each parameter tensor lies in a genome (per-tensor merge methods use it)."""
        return tensor_segments(self.space.slots)

    def initial(self) -> dict[str, torch.Tensor]:
        """The parent genomes by name (after the base, when ``include_base``)."""
        return {**({"base": self.base} if self.include_base else {}), **self.parents}

    @torch.no_grad()
    def merge_(
        self,
        method: MergeMethod,
        weights: Sequence[float],
        *,
        split: int | None = None,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge the parents (with the base) into the workspace, tensor by tensor; returns it."""
        ws = self.workspace
        parents = list(self.parents.values())
        method.merge_(ws, self.base, parents, weights, segments=self.segments, split=split, rng=rng)
        self.writes += 1
        return ws

    def weights(self, genome: torch.Tensor) -> torch.Tensor:
        """The model weights [P] a genome stands for (here the genome itself, copied)."""
        return genome.detach().clone()

    def _load(self, genome: torch.Tensor) -> nn.Module:
        if not is_workspace(self, genome):
            self.space.load(genome)
            self.writes += 1
        return self.space.model

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        """[D] float scores on the suite's selection split (column order fixed by the suite)."""
        return self._score(self._load(genome), self.tokenizer).float().cpu()

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Held-out score per task and their weighted ``mean``; remembered by the genome's
        bytes, so a model reported twice (a pick that is also an archive member) is evaluated
        once (hashing costs well under a second even at 135M parameters; an evaluation of a
        real model costs a minute)."""
        key = hashlib.sha1(genome.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
        if key not in self._heldout_memo:
            self._heldout_memo[key] = dict(self._heldout(self._load(genome), self.tokenizer))
        return dict(self._heldout_memo[key])

    def sparsity(self, genome: torch.Tensor, epsilon: float = 0.0) -> float:
        """Fraction of the prunable weights (decoder-block linears) with ``|w| <= epsilon``;
        ``epsilon=0``: the exact fraction of zeros."""
        return slots_sparsity(genome, self.prunable_slots, epsilon)

    def layer_sparsity(self, genome: torch.Tensor) -> dict[str, float]:
        """Exact fraction of zeros of each prunable layer, by layer name as in
        ``measure_sparsity`` (a 3-D fused expert weight: one ``<name>[<expert>]`` row per
        expert); read from the genome's slices, one pass over the prunable weights, no copy."""
        return slots_layer_sparsity(genome, self.prunable_slots, self._layer_names)

    def prune_(self, genome: torch.Tensor, target: float, pruner: Pruner | None = None) -> None:
        """Prune ``genome`` in place with the run's pruner (no-op without one or at 0)."""
        pruner = pruner or self.pruner
        if pruner is None or target <= 0:
            return
        model = self._load(genome)
        prune_in_place(pruner, model, self.calibration, target)  # no keep-masks held
        self.writes += 1
        if not is_workspace(self, genome):
            genome.copy_(self.space.flat)

    def prepare_in_loop(self) -> None:
        """Build the pruner's in-loop form once, before the search's first step (Wanda with
        ``in_loop='reference'``: one dense pass of each initial genome measures the input norms;
        the live model then holds the last of them). Nothing to do for other pruners."""
        self._build_in_loop()

    def _build_in_loop(self) -> None:
        if getattr(self.pruner, "in_loop", None) == "reference" and self._in_loop is None:
            models = (self._load(g) for g in self.initial().values())
            self._in_loop = self.pruner.reference(models, self.calibration)

    def prune_in_loop_(self, genome: torch.Tensor, target: float) -> None:
        """Pruning as a mutation inside the search: the run's pruner, or its cheaper in-loop
        form when it has one (``prepare_in_loop``; built here on first use if the search did
        not build it first)."""
        if self.pruner is None or target <= 0:
            return
        if getattr(self.pruner, "in_loop", None) == "reference" and self._in_loop is None:
            keep = self.space.flat.clone() if is_workspace(self, genome) else None
            self._build_in_loop()
            if keep is not None:
                self.space.flat.copy_(keep)
        self.prune_(genome, target, self._in_loop)
