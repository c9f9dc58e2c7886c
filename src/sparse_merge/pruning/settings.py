"""Settings of the masks pipeline (the ``masks`` config key).

A plain dataclass with no heavy imports: ``config.Config`` uses it as the schema of the
``masks`` key (a mistyped key fails at compose time) and the pipeline builds it from the
composed values, which runs the checks below before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparse_merge.errors import ConfigError, check_positive


@dataclass
class MasksSettings:
    """Settings of the masks pipeline (the ``masks:`` node of ``conf/experiment/masks.yaml``)."""

    root: str = "masks"  # mask directories go under <root>/<model>/sparsity50_<method>/
    model_name: str = "model"  # <model> in that layout and in the metadata
    n_calibration: int = 128  # calibration sequences from the tasks' training examples
    calibration_length: int = 64  # max tokens per calibration sequence
    answer_loss: bool = False  # gradient scores: loss on the answer tokens only (else all)
    heldout_examples: int = 256  # held-out examples per task for perplexity (0 = all)
    text_file: str | None = None  # perplexity on this UTF-8 text instead (sliding window)
    window: int | None = None  # text_file: tokens per window (default: the model's max positions)
    stride: int | None = None  # text_file: new tokens per window (default: window // 2)
    tolerance: float = 0.01  # |achieved - target| overall sparsity beyond this is reported
    plots: bool = True  # per-layer sparsity histogram and bar chart (PNG)

    def __post_init__(self) -> None:
        check_positive("masks.n_calibration", self.n_calibration)
        check_positive("masks.calibration_length", self.calibration_length)
        check_positive("masks.heldout_examples", self.heldout_examples, allow_zero=True)
        check_positive("masks.tolerance", self.tolerance, allow_zero=True)
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise ConfigError("masks.text_file", self.text_file, "an existing UTF-8 text file")
        if (
            self.window is not None
            and self.stride is not None
            and not 0 < self.stride < self.window
        ):
            raise ConfigError("masks.stride", self.stride, f"in (0, window={self.window})")
