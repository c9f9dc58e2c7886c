"""Settings of calibration (the ``calibration`` config key, shared by the merge, masks and
fine-tuning pipelines) and of the masks pipeline (the ``masks`` key).

Plain dataclasses with no heavy imports: ``config.Config`` uses them as the schemas of those
keys (a mistyped key fails at compose time) and the pipelines build them from the composed
values, which runs the checks below before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_merge.errors import check_positive


@dataclass
class CalibrationSettings:
    """The calibration sequences of activation- and gradient-aware pruners (Wanda, SparseGPT,
    gradient, Taylor) and of row selection: ``n`` training examples of the run's tasks (never
    selection or held-out data), interleaved over tasks, each cut to ``length`` tokens, drawn
    with ``seed`` (null: the run's seed). A task with fewer distinct training rows than its
    share is an error, not a silent repeat."""

    n: int = 128  # sequences
    length: int = 128  # max tokens per sequence (prompt + answer, or a corpus passage)
    seed: int | None = None  # null: the run's seed
    answer_loss: bool = False  # gradient scores: loss on the answer tokens only (else all)

    def __post_init__(self) -> None:
        check_positive("calibration.n", self.n)
        check_positive("calibration.length", self.length)
        if self.seed is not None:
            check_positive("calibration.seed", self.seed, allow_zero=True)


@dataclass
class MasksSettings:
    """Settings of the masks pipeline (the ``masks:`` node of ``conf/experiment/masks.yaml``).

    Perplexity is measured on the tasks' held-out split (``tasks.perplexity.task_nlls``): every
    token of a text corpus's passages (``task=python_docs``, ``task=wikitext``; window and
    stride are the corpus task's settings), or the answers of prompt/answer tasks."""

    root: str = "masks"  # mask directories go under <root>/<model>/sparsity50_<method>/
    model_name: str = "model"  # <model> in that layout and in the metadata
    tolerance: float = 0.01  # |achieved - target| overall sparsity beyond this is reported
    plots: bool = True  # per-layer sparsity histogram and bar chart (PNG)
    dense_cache: str | None = None  # cache of dense perplexities (by weights and data); null: off

    def __post_init__(self) -> None:
        check_positive("masks.tolerance", self.tolerance, allow_zero=True)
